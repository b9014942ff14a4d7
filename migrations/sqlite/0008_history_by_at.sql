-- Retention finds expired events by time, not by id: ids follow time only while the clock runs
-- forward. After a forward clock step (corrected later) the lowest ids are dated in the future,
-- and "the oldest ids, those outside retention" deleted nothing behind them. One index entry per
-- event (the time and the rowid); the range read stops at the first kept event.
CREATE INDEX history_by_at ON history (at);
