"""Science modules and the registry that finds them by name."""

from hfmi_kit.domains.base import Bundle, Domain, Explanation, Scored, get_domain, list_domains, register_domain

__all__ = ["Bundle", "Domain", "Explanation", "Scored", "get_domain", "list_domains", "register_domain"]
