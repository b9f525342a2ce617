-- Finding a group's open mails (mailgend.outbox rows of an earlier attempt
-- that must be resumed, not re-rendered) is done for every group claimed.
-- Without an index that look-up scans the outbox, dead rows included: at
-- ~4 ms per group it was the second-largest cost of a 100,000-event run.
-- A GIN index over the group's directive ids answers `&&` directly.
-- fastupdate is off: with the pending list on, every look-up scans the
-- list of recent insertions, which is exactly what grows during a run.
CREATE INDEX IF NOT EXISTS outbox_group_directive_ids_idx
    ON mailgend.outbox USING gin (group_directive_ids)
    WITH (fastupdate = off);
