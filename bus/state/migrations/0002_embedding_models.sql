-- Embeddings of several models side by side: one row per image, kind and model. When the
-- embed model changes, the new model's vectors arrive (re-embedding in the background)
-- next to the old ones instead of replacing them, so search keeps serving the old model
-- until the new one covers every image. Each (kind, model) keeps its own partial HNSW
-- index (embedding_indexes).

ALTER TABLE image_embeddings DROP CONSTRAINT image_embeddings_pkey;
ALTER TABLE image_embeddings ADD PRIMARY KEY (image_id, kind, model);

-- How many images each model covers, counted from an index alone (embedding_coverage).
CREATE INDEX image_embeddings_by_model ON image_embeddings (kind, model);

-- How many images are captioned, counted the same way.
CREATE INDEX images_captioned ON images (id) WHERE captioned_at IS NOT NULL;

-- The place in the stream of the re-caption request a caption answers (caption.json's
-- request_seq): a caption answering an older request never replaces a newer one's, whatever
-- order their events arrive in; an image's first caption has none.
ALTER TABLE images ADD COLUMN caption_request_seq bigint;
UPDATE images SET caption_request_seq = (caption->>'request_seq')::bigint
    WHERE jsonb_typeof(caption->'request_seq') = 'number';
