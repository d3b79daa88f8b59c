-- Node proxy hostnames (issue 11): per route hostname, the certificate the node
-- proxy serves for it and the address its DNS records were published for.
-- Keyed by hostname: routes of several ports may share one name (and its
-- certificate and records). A row exists only while some route uses the name.
CREATE TABLE node_hosts (
    hostname     TEXT PRIMARY KEY,
    cert_path    TEXT NOT NULL DEFAULT '',
    key_path     TEXT NOT NULL DEFAULT '',
    cert_serial  TEXT NOT NULL DEFAULT '',
    cert_expires TEXT NOT NULL DEFAULT '',
    dns_address  TEXT NOT NULL DEFAULT '',
    updated_at   TEXT NOT NULL
);
