-- Outgoing webhooks (bus/state/webhooks.py): the endpoints, every message sent to one, and
-- every attempt at sending it.

CREATE TABLE webhook_endpoints (
    id               text PRIMARY KEY,
    url              text NOT NULL,
    secret           text NOT NULL,          -- whsec_<base64>: signs every delivery
    -- After a rotation, older secrets sign too until they expire: [{secret, expires}]
    old_secrets      jsonb NOT NULL DEFAULT '[]',
    event_types      text[],                 -- NULL: every event; else these types (or "prefix.*")
    description      text NOT NULL DEFAULT '',
    active           boolean NOT NULL DEFAULT true,
    disabled_reason  text,
    created          timestamptz NOT NULL DEFAULT now(),
    updated          timestamptz NOT NULL DEFAULT now(),
    failing_since    timestamptz             -- first failed attempt since the last success
);

-- One message: an event for an endpoint, whatever number of attempts it takes. Its id is the
-- webhook-id header (the same on every attempt and on a replay).
CREATE TABLE webhook_messages (
    webhook_id   text PRIMARY KEY,
    endpoint_id  text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id     text NOT NULL,
    event_type   text NOT NULL,
    body         text NOT NULL,              -- the CloudEvent as sent (for a replay)
    state        text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    created      timestamptz NOT NULL DEFAULT now(),
    last_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_messages_failed ON webhook_messages (endpoint_id, created)
    WHERE state = 'failed';

CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    webhook_id   text NOT NULL REFERENCES webhook_messages (webhook_id) ON DELETE CASCADE,
    endpoint_id  text NOT NULL,
    attempt      integer NOT NULL,           -- 1 for the first try (a replay counts on)
    status_code  integer,                    -- NULL: no answer (refused, timed out...)
    latency_ms   double precision,
    error        text,                       -- NULL: delivered (a 2xx)
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_attempts_by_endpoint ON webhook_attempts (endpoint_id, id DESC);
CREATE INDEX webhook_attempts_by_message ON webhook_attempts (webhook_id);
