"""POP3 (pop3.md). TODO(issue 6): dialogue and backend login."""
from ..config import values
from ..config.directives import D, MAIL_SERVER

NAME = 'pop3'
PORTS = (110, 995)

DIRECTIVES = [
    D('pop3_capabilities', MAIL_SERVER, '1+', values.words, multi='extend',
      default=('TOP', 'USER', 'UIDL')),
    D('pop3_auth', MAIL_SERVER, '1+', values.methods('plain', 'apop', 'cram-md5', 'external'),
      multi='extend', default=('plain',)),
    # Beyond nginx (whose POP3 buffer is fixed at 128 bytes).
    D('pop3_client_buffer', MAIL_SERVER, '1', values.size, default=128),
]


def finalize(conf) -> None:
    pass
