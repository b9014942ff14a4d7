-- A shortcut for reconciles: per (kind, Pendo id, mapping), a 64-bit digest of the mapped values
-- that the last full diff found already in Pendo (in the shadow, nothing queued). A record whose
-- values hash to the stored digest is unchanged, so the next reconcile need not load or compare
-- its shadow row. A missing or different digest only means "diff it the long way".
--
-- The digest must never outlive the state it summarised: any change to the entity's shadow row or
-- outbox rows deletes every digest of that entity (the triggers below), whoever makes it (the
-- writer, `queue drop`, another mapping). The engine writes a digest only for records that had no
-- outbox rows when they were diffed and still have none when the page commits.
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
CREATE TRIGGER shadow_digest_after_outbox_insert AFTER INSERT ON outbox BEGIN
    DELETE FROM shadow_digest WHERE kind = NEW.kind AND pendo_id = NEW.pendo_id;
END;
CREATE TRIGGER shadow_digest_after_outbox_update AFTER UPDATE OF value, force ON outbox BEGIN
    DELETE FROM shadow_digest WHERE kind = OLD.kind AND pendo_id = OLD.pendo_id;
END;
CREATE TRIGGER shadow_digest_after_outbox_delete AFTER DELETE ON outbox BEGIN
    DELETE FROM shadow_digest WHERE kind = OLD.kind AND pendo_id = OLD.pendo_id;
END;
