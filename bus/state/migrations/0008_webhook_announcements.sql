-- An endpoint the deliverer turns off (a 410, or days of failures) is announced with a
-- webhook_disabled event once the change has committed. Until the event is out this holds
-- the moment it was turned off: a deliverer that could not publish, or died first, leaves
-- it for the next one to announce (the event's id names that moment, so it is said once).
ALTER TABLE webhook_endpoints ADD COLUMN disabled_unannounced timestamptz;
