"""Status lines: a long job made of parts says where it is at least every few seconds, with the
time left estimated from the parts done."""

import io
import re
import time

from hfmi_kit.train.progress import Status


def test_a_status_line_comes_while_a_part_runs_and_estimates_the_time_left():
    out = io.StringIO()
    with Status("job", 3, every=0.05, stream=out) as st:
        for k in range(3):
            st.start(f"fold {k + 1}/3")
            time.sleep(0.2)
            st.done()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("job: part 1/3, fold 1/3; 0 s elapsed") and "left" not in lines[0]
    beats = [x for x in lines if x.startswith("job: part 1/3")]
    assert len(beats) >= 3  # the background beat while the first part ran, not only the start line
    assert any(re.search(r"part 3/3, fold 3/3; \d+ s elapsed, about \d+ s left", x) for x in lines)
    assert lines[-1].startswith("job: done, 3 part(s) in")


def test_a_disabled_status_prints_nothing_and_an_error_stops_the_beat():
    out = io.StringIO()
    with Status("quiet", 2, every=0.01, stream=out, enabled=False) as st:
        st.start("a")
        time.sleep(0.05)
    assert out.getvalue() == ""
    out = io.StringIO()
    try:
        with Status("fails", 2, every=0.01, stream=out) as st:
            st.start("a")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    n = len(out.getvalue().splitlines())
    time.sleep(0.05)
    assert len(out.getvalue().splitlines()) == n and "done" not in out.getvalue()
