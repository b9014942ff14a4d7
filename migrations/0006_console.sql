-- The console's chart counts the Pendo batches sent during each cycle of the last day: a range
-- on the send time. One index entry per Pendo request (not per value) is all it costs the writer.
CREATE INDEX history_batches_by_sent ON history_batches (sent_at);
