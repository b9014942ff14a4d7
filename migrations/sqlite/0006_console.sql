-- The console's chart: changes found and Pendo requests per 15 minutes over the last day, read as
-- ranges on the start and send times. One index entry per cycle and per Pendo request (not per
-- value) is all they cost; `attempts` is in the index so counting HTTP requests reads it alone.
CREATE INDEX runs_by_start ON runs (started_at);
CREATE INDEX history_batches_by_sent ON history_batches (sent_at, attempts);
