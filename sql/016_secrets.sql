-- The node's secret store (issue 20): each version of a secret, its value encrypted
-- with AES-256-GCM under the node's key file ([secrets] key_file), never in clear.
-- key_id names the key a row was sealed with (the first 16 hex digits of its
-- SHA-256), so a wrong key file is told apart from a damaged row; the name and
-- version are the cipher's associated data, so a row copied under another name
-- fails to open. A few versions are kept (and every one a deployed service uses),
-- so a rollback finds the value its version ran with.
CREATE TABLE secrets (
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    PRIMARY KEY (name, version)
);
