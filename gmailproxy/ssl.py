"""TLS: one SSLContext per server block (ssl.md). TODO(TLS issue 8): contexts, handshake."""
from .config import values
from .config.directives import D, MAIL_SERVER

DIRECTIVES = [
    D('starttls', MAIL_SERVER, '1', values.choice('on', 'off', 'only'), default='off'),
    D('ssl_certificate', MAIL_SERVER, '1', values.path_or_data, multi='append', default=()),
    D('ssl_certificate_key', MAIL_SERVER, '1', values.path_or_data, multi='append', default=()),
    D('ssl_password_file', MAIL_SERVER, '1', values.path),
    D('ssl_certificate_compression', MAIL_SERVER, '1', values.flag, default=False),
    D('ssl_dhparam', MAIL_SERVER, '1', values.path),
    D('ssl_ecdh_curve', MAIL_SERVER, '1', values.string, default='auto'),
    D('ssl_protocols', MAIL_SERVER, '1+',
      values.methods('SSLv2', 'SSLv3', 'TLSv1', 'TLSv1.1', 'TLSv1.2', 'TLSv1.3'),
      multi='extend', default=('TLSv1.2', 'TLSv1.3')),
    D('ssl_ciphers', MAIL_SERVER, '1', values.string, default='HIGH:!aNULL:!MD5'),
    D('ssl_prefer_server_ciphers', MAIL_SERVER, '1', values.flag, default=False),
    D('ssl_session_cache', MAIL_SERVER, '1+', values.ssl_session_cache, default=('none',)),
    D('ssl_session_tickets', MAIL_SERVER, '1', values.flag, default=True),
    D('ssl_session_ticket_key', MAIL_SERVER, '1', values.path, multi='append', default=()),
    D('ssl_session_timeout', MAIL_SERVER, '1', values.time_s, default=300.0),
    D('ssl_verify_client', MAIL_SERVER, '1',
      values.choice('on', 'off', 'optional', 'optional_no_ca'), default='off'),
    D('ssl_verify_depth', MAIL_SERVER, '1', values.number, default=1),
    D('ssl_client_certificate', MAIL_SERVER, '1', values.path),
    D('ssl_trusted_certificate', MAIL_SERVER, '1', values.path),
    D('ssl_crl', MAIL_SERVER, '1', values.path),
    D('ssl_conf_command', MAIL_SERVER, '2', values.pair, multi='append', default=()),
]
