-- Edge routes: public TLS hostname on the node proxy -> Tailnet backend over TLS.
CREATE TABLE edge_routes (
    hostname         TEXT PRIMARY KEY,
    backend_hostname TEXT NOT NULL,
    backend_port     INTEGER NOT NULL,
    backend_address  TEXT NOT NULL,
    backend_tls      INTEGER NOT NULL DEFAULT 1,
    cert_path        TEXT NOT NULL,
    key_path         TEXT NOT NULL,
    cert_serial      TEXT NOT NULL DEFAULT '',
    cert_expires     TEXT NOT NULL DEFAULT '',
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
