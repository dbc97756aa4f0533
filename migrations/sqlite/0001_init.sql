-- cozy schema, embedded SQLite. Same tables and constraints as migrations/mysql/0001_init.sql; see the
-- comments there. Instants are INTEGER milliseconds since the Unix epoch (UTC).

CREATE TABLE users (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  email TEXT NOT NULL UNIQUE,
  password_hash TEXT NOT NULL,
  role TEXT NOT NULL CHECK (role IN ('user', 'admin')),
  created_at INTEGER NOT NULL
);

CREATE TABLE sessions (
  token_hash TEXT NOT NULL PRIMARY KEY,
  user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  expires_at INTEGER NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE resources (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  capacity INTEGER NOT NULL CHECK (capacity >= 0),
  held INTEGER NOT NULL DEFAULT 0,
  price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
  currency TEXT NOT NULL CHECK (currency GLOB '[A-Z][A-Z][A-Z]'),
  hold_seconds INTEGER NOT NULL CHECK (hold_seconds > 0),
  created_at INTEGER NOT NULL,
  CHECK (held >= 0 AND held <= capacity)
);

CREATE TABLE reservations (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  resource_id INTEGER NOT NULL REFERENCES resources (id),
  user_id INTEGER NOT NULL REFERENCES users (id),
  quantity INTEGER NOT NULL CHECK (quantity > 0),
  state TEXT NOT NULL CHECK (state IN ('RESERVED', 'PAID', 'CANCELLED', 'EXPIRED')),
  amount_cents INTEGER NOT NULL CHECK (amount_cents >= 0),
  currency TEXT NOT NULL,
  expires_at INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  request_key TEXT NULL,
  payment_started_at INTEGER NULL,
  UNIQUE (user_id, request_key)
);
CREATE INDEX reservations_live ON reservations (resource_id, state, expires_at);
CREATE INDEX reservations_due ON reservations (state, expires_at);
CREATE INDEX reservations_owner ON reservations (user_id, id);

CREATE TABLE charges (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  reservation_id INTEGER NOT NULL UNIQUE REFERENCES reservations (id),
  provider TEXT NOT NULL,
  provider_ref TEXT NOT NULL,
  amount_cents INTEGER NOT NULL CHECK (amount_cents >= 0),
  currency TEXT NOT NULL,
  captured_at INTEGER NOT NULL,
  refunded_at INTEGER NULL,
  refund_ref TEXT NULL,
  UNIQUE (provider, provider_ref)
);

CREATE TABLE reservation_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  reservation_id INTEGER NOT NULL REFERENCES reservations (id),
  from_state TEXT NULL CHECK (from_state IS NULL OR from_state IN ('RESERVED', 'PAID')),
  to_state TEXT NOT NULL CHECK (to_state IN ('RESERVED', 'PAID', 'CANCELLED', 'EXPIRED')),
  at INTEGER NOT NULL,
  cause TEXT NOT NULL
);
CREATE INDEX reservation_events_reservation ON reservation_events (reservation_id, id);

CREATE TRIGGER reservation_events_no_update BEFORE UPDATE ON reservation_events
BEGIN
  SELECT RAISE(ABORT, 'reservation_events is append-only');
END;

CREATE TRIGGER reservation_events_no_delete BEFORE DELETE ON reservation_events
BEGIN
  SELECT RAISE(ABORT, 'reservation_events is append-only');
END;

CREATE TABLE outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  topic TEXT NOT NULL,
  kind TEXT NOT NULL,
  payload TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  published_at INTEGER NULL
);
CREATE INDEX outbox_pending ON outbox (published_at, id);

CREATE TABLE idempotency_keys (
  user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  idem_key TEXT NOT NULL,
  request_hash TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('running', 'done')),
  response_status INTEGER NULL,
  response_body TEXT NULL,
  created_at INTEGER NOT NULL,
  locked_until INTEGER NOT NULL,
  PRIMARY KEY (user_id, idem_key),
  CHECK (status = 'running' OR (response_status IS NOT NULL AND response_body IS NOT NULL))
);
CREATE INDEX idempotency_age ON idempotency_keys (created_at);

CREATE TABLE sandbox_ledger (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  idem_key TEXT NOT NULL UNIQUE,
  amount_cents INTEGER NOT NULL,
  currency TEXT NOT NULL,
  method TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  refunded_at INTEGER NULL
);
