//! The outbox and its capture triggers: the SQL that records, in the
//! writer's transaction, every changed key (and, for a table with a tag
//! column, every changed tag) for the relay to apply.

use crate::config::validate_table_name;
use crate::db::Db;
use crate::error::{Error, Result};

/// The SQL of one outbox, built once from its validated name.
pub(crate) struct Outbox {
    pub(super) table: String,
    pub(super) cursors: String,
}

impl Outbox {
    pub fn new(table: &str) -> Result<Outbox> {
        validate_table_name(table)?;
        let cursors = format!("{table}_cursors");
        validate_table_name(&cursors)?;
        Ok(Outbox {
            table: table.to_owned(),
            cursors,
        })
    }

    /// The `application_name` of a relay's listening connection:
    /// `relay:<outbox>`, cut to Postgres's 63 bytes.
    pub fn listener_name(&self) -> String {
        let mut name = format!("relay:{}", self.table);
        name.truncate(63);
        name
    }

    /// The unqualified name, for objects that cannot carry a schema.
    /// The key prefixes whose tables' changes are captured into this outbox
    /// now (the first argument of every `cacheaside_capture` trigger that
    /// runs this outbox's capture function), read from the catalog.
    pub fn captured_prefixes(&self, db: &Db) -> Result<Vec<String>> {
        let function = format!("{}_capture", self.bare());
        let rows = db.uncounted().query(
            "SELECT t.tgargs FROM pg_catalog.pg_trigger t
               JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
              WHERE t.tgname = 'cacheaside_capture' AND p.proname = $1",
            &[&function],
        )?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let args: Vec<u8> = row.get(0);
                let prefix = args.split(|&b| b == 0).next()?;
                String::from_utf8(prefix.to_vec()).ok()
            })
            .collect())
    }

    fn bare(&self) -> &str {
        self.table.rsplit('.').next().unwrap_or(&self.table)
    }

    /// Creates the outbox, its cursor table and its trigger functions, and
    /// installs the triggers on `table`: every insert, update or delete of a
    /// row writes `key_prefix || <key_column>` (old and new key) to the
    /// outbox in the same transaction, with the row's version when there is
    /// a version column; a `TRUNCATE` writes a reset of `key_prefix`. With a
    /// version column, every update also bumps it if the writer did not, so
    /// a write from anywhere orders correctly. With a `tag` (a prefix and a
    /// column), the change also writes the tag `prefix || <column>` (old and
    /// new) as a tag row (`tag = true`) for the relay to invalidate.
    pub fn capture(
        &self,
        db: &Db,
        table: &str,
        key_prefix: &str,
        key_column: &str,
        version_column: Option<&str>,
        tag: Option<(&str, &str)>,
    ) -> Result<()> {
        validate_table_name(table)?;
        let tag_column = tag.map(|(_, column)| column);
        for column in std::iter::once(key_column)
            .chain(version_column)
            .chain(tag_column)
        {
            if column.contains('.') {
                return Err(Error::invalid_argument(format!(
                    "{column:?} must be a column name, not qualified"
                )));
            }
            validate_table_name(column)?;
        }
        crate::keys::check_tag_safe("key_prefix", key_prefix)?;
        let prefix = quote_literal(key_prefix);
        let tag = match tag {
            Some((tag_prefix, column)) => {
                crate::keys::check_tag_safe("tag_prefix", tag_prefix)?;
                Some((quote_literal(tag_prefix), column))
            }
            None => None,
        };
        let (outbox, cursors, bare) = (&self.table, &self.cursors, self.bare());
        let (schema, schema_dot) = match outbox.split_once('.') {
            Some((schema, _)) => (
                format!("CREATE SCHEMA IF NOT EXISTS {schema};"),
                format!("{schema}."),
            ),
            None => (String::new(), String::new()),
        };
        let tables = format!(
            "{schema}
             CREATE TABLE IF NOT EXISTS {outbox} (
                 id         bigserial PRIMARY KEY,
                 cache_key  text NOT NULL,
                 version    bigint,
                 txid       xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
                 created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
             );
             -- A reset row: every key starting with cache_key (a TRUNCATE).
             ALTER TABLE {outbox} ADD COLUMN IF NOT EXISTS
                 reset boolean NOT NULL DEFAULT false;
             -- A tag row: cache_key is a tag, whose stamp is replaced.
             ALTER TABLE {outbox} ADD COLUMN IF NOT EXISTS
                 tag boolean NOT NULL DEFAULT false;
             -- Rounds read by (txid, id): a transaction's rows, and the
             -- rows from a horizon on, in pages. (It replaces the index on
             -- txid alone that earlier versions made.)
             CREATE INDEX IF NOT EXISTS {bare}_txid_id ON {outbox} (txid, id);
             DROP INDEX IF EXISTS {schema_dot}{bare}_txid;
             -- Pruning goes by id: the created_at index earlier versions
             -- made only cost writers.
             DROP INDEX IF EXISTS {schema_dot}{bare}_created;
             CREATE TABLE IF NOT EXISTS {cursors} (
                 consumer   text PRIMARY KEY,
                 horizon    xid8 NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
             );"
        );
        // Concurrent installs (several processes starting at once) would
        // collide on CREATE OR REPLACE FUNCTION: serialize them.
        db.transaction(|tx| {
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                &[&outbox.as_str()],
            )?;
            tx.batch_execute(&tables)?;
            // The functions run as whoever writes the table, with a search
            // path of nothing but the catalog: the outbox is named by its
            // schema, as found now.
            let qualified: String = tx
                .query_opt(
                    "SELECT pg_catalog.quote_ident(n.nspname) || '.' \
                            || pg_catalog.quote_ident(c.relname)
                     FROM pg_catalog.pg_class c
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.oid = $1::text::pg_catalog.regclass",
                    &[&outbox.as_str()],
                )?
                .map(|row| row.get(0))
                .ok_or_else(|| Error::invalid_argument("the outbox table was not created"))?;
            tx.batch_execute(&self.trigger_ddl(
                &qualified,
                table,
                &prefix,
                key_column,
                version_column,
                tag,
            ))
        })
    }

    /// The capture functions and triggers. Both functions are `SECURITY
    /// INVOKER` (they run as the writer, who may be a superuser running a
    /// migration), so they trust nothing on the writer's `search_path`:
    /// it is pinned to `pg_catalog, pg_temp` (which also resolves the
    /// operators in the catalog, and never a temporary function), every
    /// function is named by schema, and the outbox by `qualified`, so
    /// neither a planted overload (`to_jsonb(<row type>)` is preferred to
    /// the built-in `anyelement` one wherever it sits on the path) nor a
    /// temporary table named like the outbox runs or swallows anything.
    fn trigger_ddl(
        &self,
        qualified: &str,
        table: &str,
        prefix: &str,
        key_column: &str,
        version_column: Option<&str>,
        tag: Option<(String, &str)>,
    ) -> String {
        let outbox = &self.table;
        let version = version_column.unwrap_or("");
        // Two more arguments for a tagged table only: a trigger an earlier
        // version installed (three arguments) runs the new function as is.
        let tag_args = match &tag {
            Some((prefix, column)) => format!(", {prefix}, '{column}'"),
            None => String::new(),
        };
        let bump = match version_column {
            Some(column) => format!(
                "CREATE TRIGGER cacheaside_version BEFORE UPDATE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION {outbox}_bump('{column}');"
            ),
            None => String::new(),
        };
        format!(
            "-- TG_ARGV: key prefix, key column, version column ('' for none),
             -- and for a tagged table tag prefix, tag column.
             CREATE OR REPLACE FUNCTION {outbox}_capture() RETURNS trigger
             LANGUAGE plpgsql SECURITY INVOKER
             SET search_path = pg_catalog, pg_temp AS $fn$
             DECLARE
                 old_key text;
                 new_key text;
                 old_tag text;
                 new_tag text;
                 new_version bigint;
                 old_row jsonb;
                 new_row jsonb;
                 tagged boolean := TG_NARGS >= 5;
             BEGIN
                 IF TG_OP <> 'INSERT' THEN
                     old_row := pg_catalog.to_jsonb(OLD);
                     old_key := TG_ARGV[0] || (old_row ->> TG_ARGV[1]);
                     IF tagged THEN
                         old_tag := TG_ARGV[3] || (old_row ->> TG_ARGV[4]);
                     END IF;
                 END IF;
                 IF TG_OP <> 'DELETE' THEN
                     new_row := pg_catalog.to_jsonb(NEW);
                     new_key := TG_ARGV[0] || (new_row ->> TG_ARGV[1]);
                     IF TG_ARGV[2] <> '' THEN
                         new_version := (new_row ->> TG_ARGV[2])::bigint;
                     END IF;
                     IF tagged THEN
                         new_tag := TG_ARGV[3] || (new_row ->> TG_ARGV[4]);
                     END IF;
                 END IF;
                 -- Every tag the row had or has (a NULL column: none).
                 IF old_tag IS NOT NULL THEN
                     INSERT INTO {qualified} (cache_key, tag) VALUES (old_tag, true);
                 END IF;
                 IF new_tag IS DISTINCT FROM old_tag AND new_tag IS NOT NULL THEN
                     INSERT INTO {qualified} (cache_key, tag) VALUES (new_tag, true);
                 END IF;
                 -- A key that no longer exists is invalidated whatever is
                 -- cached; the new key only if the cache is older.
                 IF old_key IS DISTINCT FROM new_key AND old_key IS NOT NULL THEN
                     INSERT INTO {qualified} (cache_key) VALUES (old_key);
                 END IF;
                 IF new_key IS NOT NULL THEN
                     INSERT INTO {qualified} (cache_key, version) VALUES (new_key, new_version);
                 END IF;
                 RETURN NULL;
             END
             $fn$;
             -- TG_ARGV: version column. Every update moves it forward: one
             -- that left it alone (psql, another service) to at least the
             -- clock in microseconds, the unit of write-behind's sequence
             -- numbers, so a change enqueued before this write and flushed
             -- after it is older by version and does not land over it.
             CREATE OR REPLACE FUNCTION {outbox}_bump() RETURNS trigger
             LANGUAGE plpgsql SECURITY INVOKER
             SET search_path = pg_catalog, pg_temp AS $fn$
             DECLARE
                 was bigint := (pg_catalog.to_jsonb(OLD) ->> TG_ARGV[0])::bigint;
             BEGIN
                 IF (pg_catalog.to_jsonb(NEW) ->> TG_ARGV[0])::bigint <= was THEN
                     NEW := pg_catalog.jsonb_populate_record(NEW,
                         pg_catalog.jsonb_build_object(TG_ARGV[0], GREATEST(was + 1,
                             (pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000000)::bigint)));
                 END IF;
                 RETURN NEW;
             END
             $fn$;
             -- TG_ARGV: key prefix. A TRUNCATE resets every key under it.
             CREATE OR REPLACE FUNCTION {outbox}_reset() RETURNS trigger
             LANGUAGE plpgsql SECURITY INVOKER
             SET search_path = pg_catalog, pg_temp AS $fn$
             BEGIN
                 INSERT INTO {qualified} (cache_key, reset) VALUES (TG_ARGV[0], true);
                 RETURN NULL;
             END
             $fn$;
             DROP TRIGGER IF EXISTS cacheaside_capture ON {table};
             DROP TRIGGER IF EXISTS cacheaside_truncate ON {table};
             DROP TRIGGER IF EXISTS cacheaside_version ON {table};
             CREATE TRIGGER cacheaside_capture
                 AFTER INSERT OR UPDATE OR DELETE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION {outbox}_capture({prefix}, '{key_column}', '{version}'{tag_args});
             CREATE TRIGGER cacheaside_truncate
                 AFTER TRUNCATE ON {table}
                 FOR EACH STATEMENT EXECUTE FUNCTION {outbox}_reset({prefix});
             -- Also under session_replication_role = replica (a logical
             -- replication apply, a restore): a change the cache missed
             -- is stale whoever made it.
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER cacheaside_capture;
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER cacheaside_truncate;
             {bump}"
        )
    }
}

/// `text` as an SQL string literal, as Postgres's `quote_literal` makes
/// it: quotes doubled, and with a backslash an `E'…'` literal with the
/// backslashes doubled, which reads the same whatever
/// `standard_conforming_strings` says (a plain `'…'` literal reads `\'`
/// as an escaped quote when it is off: SQL injection through a prefix).
fn quote_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_literal_escapes_as_postgres_does() {
        assert_eq!(quote_literal("user:"), "'user:'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'"), r"E'a\\b'''");
    }
}
