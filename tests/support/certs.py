"""Test certificates made at test time with trustme: a CA the proxy trusts, a second CA it
does not, server pairs (RSA and ECDSA) and client certificates from each.

    pki = PKI(tmp_path)
    conf = 'ssl_certificate %s; ssl_certificate_key %s;' % pki.server_files('rsa')
    ctx = pki.client_context(client='trusted')     # trusts pki.ca, presents a client cert

Nothing here imports gmailproxy; the files are written once per PKI folder.
"""
from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import trustme

SERVER_NAMES = ('localhost', '127.0.0.1')
CLIENT_NAME = 'client.example.com'


class PKI:
    """Certificates under ``folder``; attribute paths are ``Path`` objects."""

    def __init__(self, folder, server_names=SERVER_NAMES):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name='Gmailproxy Test CA',
                             organization_unit_name='Testing', key_type=trustme.KeyType.RSA)
        self.other_ca = trustme.CA(organization_name='Untrusted CA',
                                   organization_unit_name='Elsewhere')
        self.ca_file = self._write('ca.pem', self.ca.cert_pem.bytes())
        self.other_ca_file = self._write('other-ca.pem', self.other_ca.cert_pem.bytes())
        self.servers = {
            'rsa': self.ca.issue_cert(*server_names, key_type=trustme.KeyType.RSA),
            'ecdsa': self.ca.issue_cert(*server_names, key_type=trustme.KeyType.ECDSA),
        }
        self.clients = {
            'trusted': self.ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME,
                                          organization_name='Example Org',
                                          organization_unit_name='Mail Users'),
            'untrusted': self.other_ca.issue_cert('rogue.example', common_name='rogue.example',
                                                  organization_name='Rogue Org',
                                                  organization_unit_name='Rogues'),
        }

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def server_files(self, kind: str = 'rsa') -> tuple[Path, Path]:
        """(certificate with chain, key) files for the server pair ``kind``."""
        return self.leaf_files('server-' + kind, self.servers[kind])

    def leaf_files(self, name: str, leaf) -> tuple[Path, Path]:
        """The leaf certificate alone (trustme's chain would add the self-signed root,
        which changes OpenSSL's verify error) and its key."""
        cert = self.dir / (name + '.pem')
        key = self.dir / (name + '.key')
        if not cert.exists():
            cert.write_bytes(leaf.cert_chain_pems[0].bytes())
            key.write_bytes(leaf.private_key_pem.bytes())
        return cert, key

    def issue_server(self, name: str, *names: str, kind: str = 'rsa') -> tuple[Path, Path]:
        """Another server pair for ``names`` (for SNI tests)."""
        key_type = trustme.KeyType.RSA if kind == 'rsa' else trustme.KeyType.ECDSA
        return self.leaf_files(name, self.ca.issue_cert(*names, key_type=key_type))

    def client_files(self, which: str = 'trusted') -> tuple[Path, Path]:
        return self.leaf_files('client-' + which, self.clients[which])

    def chained_client_files(self) -> tuple[Path, Path]:
        """A client certificate issued by an intermediate CA of the test CA: the file
        holds the leaf and the intermediate (depth 2 up to the trusted root)."""
        cert = self.dir / 'client-chained.pem'
        key = self.dir / 'client-chained.key'
        if not cert.exists():
            leaf = self.ca.create_child_ca().issue_cert(
                'chained.example.com', common_name='chained.example.com')
            cert.write_bytes(b''.join(b.bytes() for b in leaf.cert_chain_pems[:2]))
            key.write_bytes(leaf.private_key_pem.bytes())
        return cert, key

    def client_der(self, which: str = 'trusted') -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.clients[which].cert_chain_pems[0].bytes()
                                        .decode('ascii'))

    def client_pem(self, which: str = 'trusted') -> bytes:
        return self.clients[which].cert_chain_pems[0].bytes()

    def client_context(self, client: str | None = None, verify: bool = True,
                       alpn: list[str] | None = None,
                       max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client context trusting the test CA (``verify``), presenting the client
        certificate ``client`` ('trusted' or 'untrusted') if given."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if verify:
            self.ca.configure_trust(ctx)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if client is not None:
            cert, key = self.client_files(client)
            ctx.load_cert_chain(cert, key)
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        if max_version is not None:
            ctx.maximum_version = max_version
        return ctx

    def crl_file(self, revoke_trusted_client: bool = True) -> Path:
        """A CRL of the test CA, revoking the trusted client certificate if asked."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca_cert.subject)
                   .last_update(now - datetime.timedelta(hours=1))
                   .next_update(now + datetime.timedelta(days=1)))
        if revoke_trusted_client:
            client = x509.load_der_x509_certificate(self.client_der('trusted'))
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(client.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=5)).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        return self._write('ca.crl', crl.public_bytes(serialization.Encoding.PEM))
