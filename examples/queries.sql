-- Statements a Lambda handler might send through RDS Proxy; pinpool-lint reports the ones
-- that pin the session.
SELECT id, name FROM users WHERE id = $1;

SET search_path = app, public;

INSERT INTO visits (path) VALUES ($1) RETURNING id;

SELECT nextval('visits_id_seq');

BEGIN;
SET LOCAL statement_timeout = '5s';
SELECT pg_advisory_xact_lock(42);
COMMIT;
