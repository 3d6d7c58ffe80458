"""SMTP (smtp.md). TODO(issue 7): dialogue, resolver, backend login."""
from ..config import values
from ..config.directives import D, MAIL_SERVER

NAME = 'smtp'
PORTS = (25, 465, 587)

DIRECTIVES = [
    D('smtp_client_buffer', MAIL_SERVER, '1', values.size, default=values.page_size),
    D('smtp_greeting_delay', MAIL_SERVER, '1', values.time_ms, default=0.0),
    D('smtp_capabilities', MAIL_SERVER, '1+', values.words, multi='extend', default=()),
    D('smtp_auth', MAIL_SERVER, '1+',
      values.methods('plain', 'login', 'cram-md5', 'external', 'none'),
      multi='extend', default=('plain', 'login')),
]


def finalize(conf) -> None:
    pass
