"""set_real_ip_from: which peers may replace the client address (realip_proxy_protocol.md)."""
from .config import values
from .config.directives import D, MAIL_SERVER

DIRECTIVES = [
    D('set_real_ip_from', MAIL_SERVER, '1', values.real_ip_from, multi='append', default=()),
]
