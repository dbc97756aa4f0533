-- cozy schema, MySQL 8 / MariaDB 10.6+.
-- Integrity lives here, not only in code: foreign keys, UNIQUE keys, CHECK constraints, and triggers that
-- keep the transition log append-only. Instants are BIGINT milliseconds since the Unix epoch (UTC).

CREATE TABLE users (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  email VARCHAR(254) NOT NULL,
  password_hash VARCHAR(255) NOT NULL,
  role VARCHAR(16) NOT NULL,
  created_at BIGINT NOT NULL,
  UNIQUE KEY users_email (email),
  CONSTRAINT users_role CHECK (role IN ('user', 'admin'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The embedded session store (used when no Redis is configured). Only a hash of the token is kept.
CREATE TABLE sessions (
  token_hash CHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
  user_id BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  created_at BIGINT NOT NULL,
  KEY sessions_expiry (expires_at),
  CONSTRAINT sessions_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB;

-- `held` is the quantity of PAID reservations plus RESERVED ones not yet marked EXPIRED. It moves only in
-- the transaction that changes a reservation's state, and the CHECK makes overselling impossible whatever
-- the code does: the conditional UPDATE that would push it over capacity fails.
CREATE TABLE resources (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(200) NOT NULL,
  capacity BIGINT NOT NULL,
  held BIGINT NOT NULL DEFAULT 0,
  price_cents BIGINT NOT NULL,
  currency CHAR(3) CHARACTER SET ascii NOT NULL,
  hold_seconds BIGINT NOT NULL,
  created_at BIGINT NOT NULL,
  CONSTRAINT resources_capacity CHECK (capacity >= 0),
  CONSTRAINT resources_held CHECK (held >= 0 AND held <= capacity),
  CONSTRAINT resources_price CHECK (price_cents >= 0),
  CONSTRAINT resources_hold CHECK (hold_seconds > 0),
  CONSTRAINT resources_currency CHECK (currency REGEXP '^[A-Z]{3}$')
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE reservations (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  resource_id BIGINT NOT NULL,
  user_id BIGINT NOT NULL,
  quantity BIGINT NOT NULL,
  state VARCHAR(16) CHARACTER SET ascii NOT NULL,
  amount_cents BIGINT NOT NULL,
  currency CHAR(3) CHARACTER SET ascii NOT NULL,
  expires_at BIGINT NOT NULL,
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL,
  -- The Idempotency-Key that created the row: a retried create after a crash finds it instead of
  -- inserting a second reservation.
  request_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL,
  -- Set when a payment was sent to the gateway; `cozy sweep` reconciles attempts that never finished.
  payment_started_at BIGINT NULL,
  UNIQUE KEY reservations_request (user_id, request_key),
  KEY reservations_live (resource_id, state, expires_at),
  KEY reservations_due (state, expires_at),
  KEY reservations_owner (user_id, id),
  CONSTRAINT reservations_resource FOREIGN KEY (resource_id) REFERENCES resources (id),
  CONSTRAINT reservations_user FOREIGN KEY (user_id) REFERENCES users (id),
  CONSTRAINT reservations_quantity CHECK (quantity > 0),
  CONSTRAINT reservations_amount CHECK (amount_cents >= 0),
  CONSTRAINT reservations_state CHECK (state IN ('RESERVED', 'PAID', 'CANCELLED', 'EXPIRED'))
) ENGINE=InnoDB;

-- A captured charge. UNIQUE (reservation_id): at most one captured charge per reservation, ever.
CREATE TABLE charges (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  reservation_id BIGINT NOT NULL,
  provider VARCHAR(32) CHARACTER SET ascii NOT NULL,
  provider_ref VARCHAR(128) CHARACTER SET ascii NOT NULL,
  amount_cents BIGINT NOT NULL,
  currency CHAR(3) CHARACTER SET ascii NOT NULL,
  captured_at BIGINT NOT NULL,
  -- A refund is recorded (refunded_at) in the cancelling transaction; refund_ref is set once the gateway
  -- confirmed it. `cozy sweep` retries refunds that were recorded but not confirmed.
  refunded_at BIGINT NULL,
  refund_ref VARCHAR(128) CHARACTER SET ascii NULL,
  UNIQUE KEY charges_one_per_reservation (reservation_id),
  UNIQUE KEY charges_provider_ref (provider, provider_ref),
  CONSTRAINT charges_reservation FOREIGN KEY (reservation_id) REFERENCES reservations (id),
  CONSTRAINT charges_amount CHECK (amount_cents >= 0)
) ENGINE=InnoDB;

-- Append-only log of every state transition (from_state NULL for creation).
CREATE TABLE reservation_events (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  reservation_id BIGINT NOT NULL,
  from_state VARCHAR(16) CHARACTER SET ascii NULL,
  to_state VARCHAR(16) CHARACTER SET ascii NOT NULL,
  at BIGINT NOT NULL,
  cause VARCHAR(255) NOT NULL,
  KEY reservation_events_reservation (reservation_id, id),
  CONSTRAINT reservation_events_reservation FOREIGN KEY (reservation_id) REFERENCES reservations (id),
  CONSTRAINT reservation_events_to CHECK (to_state IN ('RESERVED', 'PAID', 'CANCELLED', 'EXPIRED')),
  CONSTRAINT reservation_events_from CHECK (from_state IS NULL OR from_state IN ('RESERVED', 'PAID'))
) ENGINE=InnoDB;

CREATE TRIGGER reservation_events_no_update BEFORE UPDATE ON reservation_events
FOR EACH ROW
BEGIN
  SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'reservation_events is append-only';
END;

CREATE TRIGGER reservation_events_no_delete BEFORE DELETE ON reservation_events
FOR EACH ROW
BEGIN
  SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'reservation_events is append-only';
END;

-- Transactional outbox: written in the same transaction as the change it describes, so an event exists
-- if and only if its transaction committed. The realtime hub publishes rows and stamps published_at.
CREATE TABLE outbox (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  topic VARCHAR(128) NOT NULL,
  kind VARCHAR(64) NOT NULL,
  payload TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  published_at BIGINT NULL,
  KEY outbox_pending (published_at, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Idempotency-Key records, scoped per user (http-api.md).
CREATE TABLE idempotency_keys (
  user_id BIGINT NOT NULL,
  idem_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  request_hash CHAR(64) CHARACTER SET ascii NOT NULL,
  status VARCHAR(16) CHARACTER SET ascii NOT NULL,
  response_status INT NULL,
  response_body MEDIUMTEXT NULL,
  created_at BIGINT NOT NULL,
  locked_until BIGINT NOT NULL,
  PRIMARY KEY (user_id, idem_key),
  KEY idempotency_age (created_at),
  CONSTRAINT idempotency_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE,
  CONSTRAINT idempotency_status CHECK (status IN ('running', 'done')),
  CONSTRAINT idempotency_done CHECK (status = 'running' OR (response_status IS NOT NULL AND response_body IS NOT NULL))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- The sandbox payment gateway's own ledger. It stands for the card network's books: cozy's code only
-- touches it through the gateway, in the gateway's own autocommit statements, never inside cozy's
-- transactions. UNIQUE (idem_key) is the gateway's idempotency: a key charges once.
CREATE TABLE sandbox_ledger (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  idem_key VARCHAR(128) CHARACTER SET ascii NOT NULL,
  amount_cents BIGINT NOT NULL,
  currency CHAR(3) CHARACTER SET ascii NOT NULL,
  method VARCHAR(64) NOT NULL,
  created_at BIGINT NOT NULL,
  refunded_at BIGINT NULL,
  UNIQUE KEY sandbox_ledger_key (idem_key)
) ENGINE=InnoDB;
