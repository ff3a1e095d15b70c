#!/usr/bin/env bash
# Gives the local PostgreSQL what the password tests need: a role that must log in with a
# password (SCRAM-SHA-256), even on a server that trusts every other local connection.
# Idempotent; run as root (or the postgres user) on the machine that runs the server.
set -euo pipefail
version=$(ls /etc/postgresql | sort -V | tail -n 1)
hba=/etc/postgresql/$version/main/pg_hba.conf
line='host all pinpool_pw 127.0.0.1/32 scram-sha-256'
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d postgres "$@"; }
psql_admin <<'SQL'
SET password_encryption = 'scram-sha-256';
DO $$ BEGIN CREATE ROLE pinpool_pw LOGIN;
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
ALTER ROLE pinpool_pw PASSWORD 'pinpool-test-secret';
SQL
if ! grep -qxF "$line" "$hba"; then
  # Above the trust lines: pg_hba.conf takes the first line that matches.
  sed -i "1i $line" "$hba"
  psql_admin -c 'SELECT pg_reload_conf()' >/dev/null
fi
