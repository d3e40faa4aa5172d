-- The images generated from an image (its lineage's children, GET /api/images/{id}/lineage):
-- found by this index instead of a scan of every image.
CREATE INDEX images_by_parent ON images ((upload -> 'lineage' ->> 'parent'))
    WHERE upload -> 'lineage' ->> 'parent' IS NOT NULL;
-- The other outputs of an image's job.
CREATE INDEX images_by_job ON images ((upload -> 'lineage' ->> 'job_id'))
    WHERE upload -> 'lineage' ->> 'job_id' IS NOT NULL;
