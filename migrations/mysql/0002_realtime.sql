-- Realtime history (src/realtime/store.rs): every sequenced frame of a room, so a client that reconnects
-- with `since` can be replayed what it missed.
--
-- `rt_rooms.last_seq` is the room's head. A message takes `last_seq + 1` in the transaction that inserts
-- it, under the room row's lock, so seqs start at 1 and have no gaps: a transaction that rolls back gives
-- its seq back with it. UNIQUE (room, seq) makes a duplicate seq impossible whatever the code does.

CREATE TABLE rt_rooms (
  room VARCHAR(191) NOT NULL PRIMARY KEY,
  last_seq BIGINT NOT NULL DEFAULT 0,
  CONSTRAINT rt_rooms_name CHECK (CHAR_LENGTH(room) >= 1),
  CONSTRAINT rt_rooms_seq CHECK (last_seq >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- kind 'message': published by a client; user_id and client_msg_id are set, and UNIQUE (user_id, room,
-- client_msg_id) turns a resend into a lookup of the original. kind 'reservation': published by the
-- server from an outbox row; UNIQUE (outbox_id, room) means an outbox row is published into a room once.
-- body is the JSON the frame carries (the message body, or {"reservation": …, "available": …}).
CREATE TABLE rt_messages (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  room VARCHAR(191) NOT NULL,
  seq BIGINT NOT NULL,
  kind VARCHAR(16) CHARACTER SET ascii NOT NULL,
  user_id BIGINT NULL,
  client_msg_id VARCHAR(128) NULL,
  outbox_id BIGINT NULL,
  body MEDIUMTEXT NOT NULL,
  created_at BIGINT NOT NULL,
  UNIQUE KEY rt_messages_seq (room, seq),
  UNIQUE KEY rt_messages_client (user_id, room, client_msg_id),
  UNIQUE KEY rt_messages_outbox (outbox_id, room),
  -- Retention (purge): a room's old messages, with seq in the index so the "behind the head" test needs
  -- no row lookup.
  KEY rt_messages_retention (room, created_at, seq),
  CONSTRAINT rt_messages_room FOREIGN KEY (room) REFERENCES rt_rooms (room),
  CONSTRAINT rt_messages_user FOREIGN KEY (user_id) REFERENCES users (id),
  CONSTRAINT rt_messages_seq_positive CHECK (seq >= 1),
  CONSTRAINT rt_messages_kind CHECK (kind IN ('message', 'reservation')),
  CONSTRAINT rt_messages_client_id CHECK (client_msg_id IS NULL OR CHAR_LENGTH(client_msg_id) >= 1),
  CONSTRAINT rt_messages_origin CHECK (
    (kind = 'message' AND user_id IS NOT NULL AND client_msg_id IS NOT NULL AND outbox_id IS NULL)
    OR (kind = 'reservation' AND user_id IS NULL AND client_msg_id IS NULL AND outbox_id IS NOT NULL)),
  CONSTRAINT rt_messages_body CHECK (JSON_VALID(body))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
