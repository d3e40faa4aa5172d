-- The image read model: one row per image, projected from its events by notify.
-- Each stage's columns carry the stream sequence of the event that wrote them, so an older
-- event (a replay, a late redelivery) never overwrites newer state.

CREATE TABLE images (
    id            text PRIMARY KEY,
    kind          text NOT NULL DEFAULT 'upload' CHECK (kind IN ('upload', 'generated')),
    created       timestamptz NOT NULL,   -- the uploaded/generated event's time
    name          text NOT NULL DEFAULT '',
    upload        jsonb,                  -- what the uploaded/generated event said
    upload_seq    bigint,
    uploaded_at   timestamptz,
    ingest        jsonb,                  -- ingest.json: renditions, blurhash, EXIF summary...
    ingest_seq    bigint,
    ingested_at   timestamptz,
    width         integer,
    height        integer,
    taken         timestamptz,            -- EXIF date taken, when known
    caption       jsonb,                  -- caption.json
    caption_seq   bigint,
    captioned_at  timestamptz,
    caption_text  text,
    tags          text[] NOT NULL DEFAULT '{}',
    nsfw          real,
    failure       jsonb,                  -- the last failed.<stage> event's data
    failure_seq   bigint,
    failed_at     timestamptz,
    approval      text NOT NULL DEFAULT 'none'
                  CHECK (approval IN ('none', 'pending', 'approved', 'rejected')),
    search        tsvector NOT NULL DEFAULT ''::tsvector,  -- kept by images_search()
    -- The furthest stage reached; a stage's failure is healed once its output exists.
    status        text GENERATED ALWAYS AS (
        CASE
            WHEN failure IS NOT NULL AND NOT (
                (failure->>'stage' = 'ingest' AND ingested_at IS NOT NULL)
                OR (failure->>'stage' = 'caption' AND captioned_at IS NOT NULL)
            ) THEN 'failed'
            WHEN captioned_at IS NOT NULL THEN 'ready'
            WHEN ingested_at IS NOT NULL THEN 'ingested'
            ELSE 'uploaded'
        END
    ) STORED,
    taken_or_created timestamptz GENERATED ALWAYS AS (coalesce(taken, created)) STORED,
    -- The newest stage's time: derived, so it is the same however the row was rebuilt.
    updated       timestamptz GENERATED ALWAYS AS (
        greatest(created, uploaded_at, ingested_at, captioned_at, failed_at)
    ) STORED
);

CREATE INDEX images_by_created ON images (created DESC, id DESC);
CREATE INDEX images_by_taken ON images (taken_or_created DESC, id DESC);
CREATE INDEX images_by_status ON images (status, created DESC, id DESC);
CREATE INDEX images_by_approval ON images (approval, created DESC, id DESC);
CREATE INDEX images_search ON images USING gin (search);

CREATE FUNCTION images_search() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.search := to_tsvector(
        'simple',
        NEW.name || ' ' || coalesce(NEW.caption_text, '') || ' '
            || array_to_string(NEW.tags, ' ')
    );
    RETURN NEW;
END
$$;

CREATE TRIGGER images_search BEFORE INSERT OR UPDATE OF name, caption_text, tags ON images
    FOR EACH ROW EXECUTE FUNCTION images_search();

-- Tags with their scores; the sort keys are copied here so a tag-filtered page is one
-- index range scan.
CREATE TABLE image_tags (
    image_id          text NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    tag               text NOT NULL,
    score             real,
    created           timestamptz NOT NULL,
    taken_or_created  timestamptz NOT NULL,
    PRIMARY KEY (image_id, tag)
);

CREATE INDEX image_tags_by_created ON image_tags (tag, created DESC, image_id DESC);
CREATE INDEX image_tags_by_taken ON image_tags (tag, taken_or_created DESC, image_id DESC);

-- One embedding per image and kind ('image', 'text'), from whichever model made it. Each
-- model gets its own HNSW index (partial, on the vector cast to that model's dimensions),
-- made when its first embedding arrives; a new model simply gets a new index.
CREATE TABLE image_embeddings (
    image_id   text NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    kind       text NOT NULL,
    model      text NOT NULL,
    dim        integer NOT NULL,
    embedding  vector NOT NULL,
    seq        bigint NOT NULL,
    PRIMARY KEY (image_id, kind)
);

CREATE TABLE embedding_indexes (
    kind   text NOT NULL,
    model  text NOT NULL,
    dim    integer NOT NULL,
    name   text NOT NULL UNIQUE,
    PRIMARY KEY (kind, model)
);
