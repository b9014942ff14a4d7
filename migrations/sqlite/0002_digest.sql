-- A shortcut for reconciles: per (kind, Pendo id, mapping), a 64-bit digest of the mapped values
-- that the last full diff found already in Pendo (in the shadow, nothing queued). A record whose
-- values hash to the stored digest is unchanged, so the next reconcile need not load or compare
-- its shadow row. A missing or different digest only means "diff it the long way".
--
-- A digest says: "these values are the values this entity's shadow row holds for the mapping's
-- fields". It must never outlive that row's state: any change to the shadow row deletes every
-- digest of the entity (the triggers below), whoever makes it. The engine writes a digest only for
-- records whose diff was empty with no outbox rows, and that still have none when the page
-- commits; and a reconcile ignores the digests of entities that have outbox rows (the diff must
-- then compare against the queued values). Outbox changes therefore need no trigger, which keeps
-- enqueueing a change from writing to this table.
CREATE TABLE shadow_digest (
    kind     TEXT    NOT NULL,
    pendo_id TEXT    NOT NULL,
    mapping  TEXT    NOT NULL,
    -- 16 bytes: the engine's 64-bit hash of pendo_id (crate::digest::id_hash), then the values
    -- digest, both little-endian. A reconcile loads a million of them as one blob per 50,000,
    -- which costs a fraction of converting integers to text.
    entry    BLOB    NOT NULL CHECK (length(entry) = 16),
    PRIMARY KEY (kind, pendo_id, mapping)
) WITHOUT ROWID;

CREATE TRIGGER shadow_digest_after_shadow_insert AFTER INSERT ON shadow BEGIN
    DELETE FROM shadow_digest WHERE kind = NEW.kind AND pendo_id = NEW.pendo_id;
END;
CREATE TRIGGER shadow_digest_after_shadow_update AFTER UPDATE ON shadow BEGIN
    DELETE FROM shadow_digest WHERE kind = OLD.kind AND pendo_id = OLD.pendo_id;
END;
CREATE TRIGGER shadow_digest_after_shadow_delete AFTER DELETE ON shadow BEGIN
    DELETE FROM shadow_digest WHERE kind = OLD.kind AND pendo_id = OLD.pendo_id;
END;
