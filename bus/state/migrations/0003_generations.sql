-- Generation jobs: one row per job, projected by notify from its events (requested,
-- generated, failed.generate, cancelled.generate; bus/state/generations.py). Like the
-- images, each part records the stream sequence of the event that wrote it, so an older
-- event (a replay, a late redelivery) never overwrites newer state, whatever the order.

CREATE TABLE generations (
    id           text PRIMARY KEY,
    created      timestamptz NOT NULL,   -- the request's time (its first event's until then)
    updated      timestamptz NOT NULL,   -- the newest event's time
    request      jsonb,                  -- the job document (requests/<job>.json)
    request_seq  bigint,
    model        text,                   -- the catalogue model that ran, else the one asked for
    n            integer,                -- images asked for
    outputs      jsonb NOT NULL DEFAULT '{}',  -- by index: image_id, key, seed, model, timings, seq
    ended        text CHECK (ended IN ('failed', 'cancelled')),
    error        text,                   -- why it failed or was cancelled
    ended_seq    bigint,
    ended_at     timestamptz,
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    finished_at  timestamptz             -- the last output's time, or when it failed or was cancelled
);

CREATE INDEX generations_by_created ON generations (created DESC, id DESC);
CREATE INDEX generations_by_status ON generations (status, created DESC, id DESC);
