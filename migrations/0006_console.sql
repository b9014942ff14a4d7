-- Reads of the status model (every /metrics scrape, every console overview) on a big outbox.

-- Per state, the entities (kind, id), the oldest enqueue time and the held values per mapping,
-- from the index alone: without it, counting ids sorts every row into a temporary b-tree, and
-- the oldest pending change and the held values look up every row of their state (at 100k rows:
-- 54, 33 and 25 ms; with it 13, 4 and ~1 ms).
CREATE INDEX outbox_by_entity ON outbox (state, kind, pendo_id, enqueued_at, mapping);

-- The console's chart counts the Pendo batches sent during each cycle of the last day: a range
-- on the send time. One index entry per Pendo request (not per value).
CREATE INDEX history_batches_by_sent ON history_batches (sent_at);
