-- Approvals' bookkeeping (bus/state/approvals.py): the carousel's version, so that a poll
-- costs one small read instead of a scan of every shown image; and the approval policy the
-- rows were judged with, so that a process started with another one says so.

-- The carousel's version, in shards, so that notify's concurrent projections seldom wait on
-- one another (each event writes one image row, so one shard: no deadlock). A trigger on
-- images bumps the image's shard in the same transaction whenever a row enters the carousel,
-- leaves it, or gets a newer upload, ingest, caption or decision event while in it; the sum
-- of the versions only grows. total: the images in the carousel.
CREATE TABLE carousel_version (
    shard    smallint PRIMARY KEY CHECK (shard BETWEEN 0 AND 15),
    version  bigint NOT NULL DEFAULT 0,
    total    bigint NOT NULL DEFAULT 0
);

-- In the carousel: shown (approval none or approved; SHOWN_ONLY in bus/state/readmodel.py)
-- and ingested (_CAROUSEL in bus/state/approvals.py): keep the three in step.
INSERT INTO carousel_version (shard, total)
SELECT g, count(i.id)
FROM generate_series(0, 15) g
LEFT JOIN images i
    ON (hashtext(i.id) & 15) = g
    AND i.approval IN ('none', 'approved') AND i.ingested_at IS NOT NULL
GROUP BY g;

CREATE FUNCTION carousel_bump() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was boolean := false;
    now_in boolean := false;
    image text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        was := OLD.approval IN ('none', 'approved') AND OLD.ingested_at IS NOT NULL;
        image := OLD.id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        now_in := NEW.approval IN ('none', 'approved') AND NEW.ingested_at IS NOT NULL;
        image := NEW.id;
    END IF;
    IF NOT (was OR now_in) THEN
        RETURN NULL;
    END IF;
    IF was AND now_in AND (OLD.upload_seq, OLD.ingest_seq, OLD.caption_seq, OLD.decision_seq)
        IS NOT DISTINCT FROM (NEW.upload_seq, NEW.ingest_seq, NEW.caption_seq, NEW.decision_seq)
    THEN
        RETURN NULL;  -- another stage of a shown image (its embeddings, say): not shown
    END IF;
    UPDATE carousel_version
    SET version = version + 1, total = total + now_in::int - was::int
    WHERE shard = (hashtext(image) & 15);
    RETURN NULL;
END $$;

CREATE TRIGGER images_carousel AFTER INSERT OR UPDATE OR DELETE ON images
    FOR EACH ROW EXECUTE FUNCTION carousel_bump();

CREATE FUNCTION carousel_emptied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE carousel_version SET version = version + 1, total = 0;
    RETURN NULL;
END $$;

CREATE TRIGGER images_carousel_emptied AFTER TRUNCATE ON images
    FOR EACH STATEMENT EXECUTE FUNCTION carousel_emptied();

-- The approval policy (approval.hold) the rows were judged with: a fingerprint of it, and
-- the policy itself to show. Written on the first start and by darkroom reindex (which
-- judges every row again); a process whose policy differs warns at start.
CREATE TABLE approval_policy (
    one          boolean PRIMARY KEY DEFAULT true CHECK (one),
    fingerprint  text NOT NULL,
    policy       jsonb NOT NULL,
    judged_at    timestamptz NOT NULL DEFAULT now()
);
