"""The protocol modules, same-shaped, no base class: ``PROTOCOLS[name]``.

Each module offers: NAME, PORTS, DIRECTIVES, REPLIES, finalize(conf), client_buffer(conf),
start(s), serve(s), reset(s), reply(s, key), auth_failed_reply(s, exc), login_upstream(s, up).
"""
from . import imap, pop3, smtp

PROTOCOLS = {'imap': imap, 'pop3': pop3, 'smtp': smtp}
