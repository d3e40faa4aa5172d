-- Approvals (bus/state/approvals.py). An image's approval is derived from its parts, like its
-- status: what the policy holds it for at each stage (written with that stage's columns, so
-- the stage's event order keeps them right), and the newest decision (its own sequence).
--   approved | rejected  an admin decided (the newest decision wins)
--   pending              a rule of the policy holds it, or the policy screens NSFW scores
--                        and its caption (with the score) has not come yet
--   none                 nothing to decide: shown like an approved image

ALTER TABLE images
    ADD COLUMN upload_hold      text,     -- why the upload stage holds it (generated, source, key)
    ADD COLUMN screen           boolean NOT NULL DEFAULT false,  -- held until its NSFW score comes
    ADD COLUMN caption_hold     text,     -- why its caption holds it (the NSFW score)
    ADD COLUMN decision         text CHECK (decision IN ('approved', 'rejected')),
    ADD COLUMN decision_seq     bigint,
    ADD COLUMN decided_at       timestamptz,
    ADD COLUMN decision_by      text,     -- the API key id that decided
    ADD COLUMN decision_reason  text,
    ADD COLUMN decision_id      text;     -- the decision event's id

DROP INDEX images_by_approval;
ALTER TABLE images DROP COLUMN approval;
ALTER TABLE images ADD COLUMN approval text GENERATED ALWAYS AS (
    CASE
        WHEN decision IS NOT NULL THEN decision
        -- A later stage's event made the row before the upload's: nothing is known of how
        -- the image came in, so it waits (fail closed) until that event lands.
        WHEN upload_seq IS NULL THEN 'pending'
        WHEN upload_hold IS NOT NULL OR caption_hold IS NOT NULL
            OR (screen AND captioned_at IS NULL) THEN 'pending'
        ELSE 'none'
    END
) STORED;
CREATE INDEX images_by_approval ON images (approval, created DESC, id DESC);

-- What the rejection sweep looks for: rejections older than approval.reject_keep_days.
CREATE INDEX images_rejected ON images (decided_at) WHERE decision = 'rejected';

-- A decision is a stage of its own: the newest stage's time includes it.
ALTER TABLE images DROP COLUMN updated;
ALTER TABLE images ADD COLUMN updated timestamptz GENERATED ALWAYS AS (
    greatest(created, uploaded_at, ingested_at, captioned_at, failed_at, decided_at)
) STORED;
