//! What a worker does with the streams themselves: finds them (and their
//! consumer groups), reads them, claims what dead or slow workers left,
//! renews its claim on what it holds, sweeps idle consumers, and leaves.
//! On a cluster the calls over many streams go in cluster pipelines, a
//! round trip per node.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;

use super::{GROUP, RawEntry, StreamState, Worker, entries, pending_consumers, read_entries};
use crate::error::Result;
use crate::observe::report;
use crate::redis_conn::millis;
use crate::write_behind::shards::StreamNames;
use crate::write_behind::{ACK_CHUNK, DEAD_CLAIM_IDLE};

impl Worker {
    /// Reads the list of streams again (cluster: slots get streams as
    /// keys are written), keeping what it knows of those it had.
    pub(super) fn refresh_streams(&mut self) -> Result<()> {
        let slots = self.shared.streams.slots(&self.engine.cache)?;
        // By slot: a cluster may list thousands.
        let mut old: HashMap<Option<u16>, StreamState> = std::mem::take(&mut self.streams)
            .into_iter()
            .map(|state| (state.names.slot, state))
            .collect();
        self.streams = slots
            .into_iter()
            .map(|slot| {
                old.remove(&slot).unwrap_or_else(|| StreamState {
                    names: self.shared.streams.names(slot),
                    ready: false,
                    claim_cursor: "0-0".into(),
                })
            })
            .collect();
        Ok(())
    }

    /// Creates stream `i`'s consumer group at its start if the stream
    /// exists; false if it does not yet (the first enqueue creates both).
    pub(super) fn ensure_group(&mut self, i: usize) -> Result<bool> {
        let stream = &self.streams[i].names.stream;
        let exists: bool = self
            .engine
            .cache
            .run(|conn| redis::cmd("EXISTS").arg(stream).query(conn))?;
        if !exists {
            return Ok(false);
        }
        self.engine.cache.run(|conn| {
            match redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(GROUP)
                .arg("0")
                .query::<()>(conn)
            {
                Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
                other => other,
            }
        })?;
        self.streams[i].ready = true;
        Ok(true)
    }

    /// On a cluster: which of the streams `waiting` exist now, in one
    /// pipeline. The enqueue that creates a stream creates its consumer
    /// group in the same script, so an existing stream is ready (a stream
    /// without its group shows as `NOGROUP` when polled, and gets one then).
    pub(super) fn find_groups(&mut self, waiting: &[usize]) -> Result<()> {
        let streams: Vec<&String> = waiting
            .iter()
            .map(|&i| &self.streams[i].names.stream)
            .collect();
        let exist: Vec<bool> = self.engine.cache.run(|conn| {
            let crate::redis_conn::RedisConnection::Cluster(cluster) = conn else {
                return Ok(Vec::new());
            };
            let mut pipe = redis::cluster::cluster_pipe();
            for stream in &streams {
                pipe.cmd("EXISTS").arg(*stream);
            }
            pipe.query(cluster)
        })?;
        for (&i, exists) in waiting.iter().zip(exist) {
            self.streams[i].ready = exists;
        }
        Ok(())
    }

    /// `XREADGROUP` of up to `count` new entries of stream `i`, blocking
    /// up to `block`.
    pub(super) fn read(
        &mut self,
        i: usize,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<RawEntry>> {
        if self.conn.is_none() {
            self.conn = Some(self.engine.cache.dedicated(self.shared.read_timeout)?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(millis(block));
        }
        cmd.arg("STREAMS")
            .arg(&self.streams[i].names.stream)
            .arg(">");
        match cmd.query::<Value>(&mut **conn) {
            Ok(reply) => Ok(read_entries(&reply)),
            Err(err) if err.code() == Some("NOGROUP") => {
                // The stream (or group) was deleted: wait for it again.
                self.streams[i].ready = false;
                Ok(Vec::new())
            }
            Err(err) => {
                // A lost reply leaves what it delivered pending for us; the
                // next claims (ours or another worker's) pick it up.
                self.conn = None;
                Err(err.into())
            }
        }
    }

    /// `XREADGROUP` of up to `count` new entries of each stream of
    /// `streams`, without blocking, in one cluster pipeline (one round trip
    /// per node; the cluster client follows a moved slot's redirect).
    pub(super) fn poll(
        &mut self,
        streams: &[usize],
        count: usize,
    ) -> Result<Vec<(usize, Vec<RawEntry>)>> {
        if self.conn.is_none() {
            self.conn = Some(self.engine.cache.dedicated(self.shared.read_timeout)?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let crate::redis_conn::RedisConnection::Cluster(cluster) = &mut **conn else {
            // Not a cluster: one stream at a time.
            let mut out = Vec::new();
            for &i in streams {
                out.push((i, self.read(i, count, None)?));
            }
            return Ok(out);
        };
        let mut pipe = redis::cluster::cluster_pipe();
        for &i in streams {
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(count.max(1))
                .arg("STREAMS")
                .arg(&self.streams[i].names.stream)
                .arg(">");
        }
        match pipe.query::<Vec<Value>>(cluster) {
            Ok(replies) => Ok(streams
                .iter()
                .zip(replies)
                .map(|(&i, reply)| (i, read_entries(&reply)))
                .collect()),
            Err(err) if err.code() == Some("NOGROUP") => {
                // A stream (or its group) is gone: create the groups of
                // those that exist, and wait for the others.
                for &i in streams {
                    self.streams[i].ready = false;
                    self.ensure_group(i)?;
                }
                Ok(Vec::new())
            }
            Err(err) => {
                // What a lost reply delivered stays pending for us; claims
                // pick it up.
                self.conn = None;
                Err(err.into())
            }
        }
    }

    /// `XAUTOCLAIM`: entries another worker (or a lost reply) left pending
    /// for longer than `claim_after`.
    pub(super) fn claim(&mut self, i: usize, count: usize) -> Result<Vec<RawEntry>> {
        let state = &self.streams[i];
        let reply: Value = self.engine.cache.run(|conn| {
            let claimed = redis::cmd("XAUTOCLAIM")
                .arg(&state.names.stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(millis(self.shared.claim_after))
                .arg(&state.claim_cursor)
                .arg("COUNT")
                .arg(count)
                .query(conn);
            match claimed {
                Err(err) if err.code() == Some("NOGROUP") => Ok(Value::Nil),
                other => other,
            }
        })?;
        if reply == Value::Nil {
            // The stream (or group) was deleted: wait for it again.
            self.streams[i].ready = false;
            return Ok(Vec::new());
        }
        let Value::Array(parts) = &reply else {
            return Ok(Vec::new());
        };
        self.streams[i].claim_cursor = match parts.first() {
            Some(Value::BulkString(cursor)) => String::from_utf8_lossy(cursor).into_owned(),
            _ => "0-0".into(),
        };
        Ok(parts.get(1).map(entries).unwrap_or_default())
    }

    /// On a cluster: [`claim`](Self::claim) over every stream of `ready`,
    /// in cluster pipelines of up to `count` streams (a round trip per node
    /// each), each stream's share of `count` at most, so no more than
    /// `count` entries are claimed in all.
    pub(super) fn claim_all(
        &mut self,
        ready: &[usize],
        count: usize,
    ) -> Result<Vec<(StreamNames, Vec<RawEntry>)>> {
        let mut claimed = Vec::new();
        let mut room = count;
        for window in ready.chunks(count.max(1)) {
            if room == 0 {
                break;
            }
            let window = &window[..window.len().min(room)];
            let each = (room / window.len()).max(1);
            let min_idle = millis(self.shared.claim_after);
            let replies: Option<Vec<Value>> = self.engine.cache.run(|conn| {
                let crate::redis_conn::RedisConnection::Cluster(cluster) = conn else {
                    return Ok(None);
                };
                let mut pipe = redis::cluster::cluster_pipe();
                for &i in window {
                    let state = &self.streams[i];
                    pipe.cmd("XAUTOCLAIM")
                        .arg(&state.names.stream)
                        .arg(GROUP)
                        .arg(&self.consumer)
                        .arg(min_idle)
                        .arg(&state.claim_cursor)
                        .arg("COUNT")
                        .arg(each);
                }
                match pipe.query::<Vec<Value>>(cluster) {
                    // A stream without its group: found again later.
                    Err(err) if err.code() == Some("NOGROUP") => Ok(Some(Vec::new())),
                    other => other.map(Some),
                }
            })?;
            let Some(replies) = replies.filter(|r| r.len() == window.len()) else {
                for &i in window {
                    self.streams[i].ready = false;
                }
                continue;
            };
            for (&i, reply) in window.iter().zip(replies) {
                let Value::Array(parts) = &reply else {
                    continue;
                };
                self.streams[i].claim_cursor = match parts.first() {
                    Some(Value::BulkString(cursor)) => String::from_utf8_lossy(cursor).into_owned(),
                    _ => "0-0".into(),
                };
                let entries = parts.get(1).map(entries).unwrap_or_default();
                room = room.saturating_sub(entries.len());
                if !entries.is_empty() {
                    claimed.push((self.streams[i].names.clone(), entries));
                }
            }
        }
        Ok(claimed)
    }

    /// Claims (up to `count`, over the streams `ready`) the changes held by
    /// workers whose liveness key has expired: dead ones, found within
    /// [`LIVENESS_TTL`] of their death rather than after `claim_after`.
    pub(super) fn claim_from_dead(
        &mut self,
        ready: &[usize],
        count: usize,
    ) -> Result<Vec<(StreamNames, Vec<RawEntry>)>> {
        let summaries = self.pending_summaries(ready)?;
        let mut others: Vec<String> = Vec::new();
        for summary in &summaries {
            for (name, _) in pending_consumers(summary) {
                if name != self.consumer && !others.contains(&name) {
                    others.push(name);
                }
            }
        }
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let alive: Vec<bool> = self.engine.cache.run(|conn| {
            let mut pipe = redis::pipe();
            for name in &others {
                pipe.cmd("EXISTS")
                    .arg(format!("{}{name}", self.shared.alive));
            }
            pipe.query(conn)
        })?;
        let dead: Vec<&String> = others
            .iter()
            .zip(alive)
            .filter(|(_, alive)| !alive)
            .map(|(name, _)| name)
            .collect();
        let mut claimed = Vec::new();
        let mut room = count;
        for (&i, summary) in ready.iter().zip(&summaries) {
            let names = self.streams[i].names.clone();
            for (name, _) in pending_consumers(summary) {
                if room == 0 || !dead.contains(&&name) {
                    continue;
                }
                let entries = self.claim_from(&names.stream, &name, room)?;
                room = room.saturating_sub(entries.len());
                claimed.push((names.clone(), entries));
            }
        }
        Ok(claimed)
    }

    /// The `XPENDING` summary of each stream of `ready` (`Nil` for one
    /// without its group): on a cluster in one pipeline, a round trip per
    /// node.
    pub(super) fn pending_summaries(&mut self, ready: &[usize]) -> Result<Vec<Value>> {
        let streams: Vec<&String> = ready
            .iter()
            .map(|&i| &self.streams[i].names.stream)
            .collect();
        let summaries = self.engine.cache.run(|conn| {
            if let crate::redis_conn::RedisConnection::Cluster(cluster) = conn
                && streams.len() > 1
            {
                let mut pipe = redis::cluster::cluster_pipe();
                for stream in &streams {
                    pipe.cmd("XPENDING").arg(*stream).arg(GROUP);
                }
                return match pipe.query::<Vec<Value>>(cluster) {
                    // A stream without its group: look at them one by one.
                    Err(err) if err.code() == Some("NOGROUP") => Ok(None),
                    other => other.map(Some),
                };
            }
            Ok(None)
        })?;
        if let Some(summaries) = summaries {
            return Ok(summaries);
        }
        let mut out = Vec::new();
        for stream in streams {
            out.push(self.engine.cache.run(|conn| {
                match redis::cmd("XPENDING").arg(stream).arg(GROUP).query(conn) {
                    Err(err) if err.code() == Some("NOGROUP") => Ok(Value::Nil),
                    other => other,
                }
            })?);
        }
        Ok(out)
    }

    /// Claims up to `count` of the changes the dead consumer `name` holds
    /// on `stream`.
    pub(super) fn claim_from(
        &mut self,
        stream: &str,
        name: &str,
        count: usize,
    ) -> Result<Vec<RawEntry>> {
        let held: Value = self.engine.cache.run(|conn| {
            redis::cmd("XPENDING")
                .arg(stream)
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(count)
                .arg(name)
                .query(conn)
        })?;
        let ids: Vec<String> = match &held {
            Value::Array(items) => items
                .iter()
                .filter_map(|item| match item {
                    Value::Array(fields) => match fields.first() {
                        Some(Value::BulkString(id)) => {
                            Some(String::from_utf8_lossy(id).into_owned())
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        report!(
            info,
            "write-behind: worker {name} is dead (no liveness key): claiming its {} changes",
            ids.len()
        );
        let reply: Value = self.engine.cache.run(|conn| {
            redis::cmd("XCLAIM")
                .arg(stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(millis(DEAD_CLAIM_IDLE))
                .arg(&ids)
                .query(conn)
        })?;
        Ok(entries(&reply))
    }

    /// Renews this worker's claim on what it holds (so nobody claims a
    /// change that only waits for its retry), and forgets what is no longer
    /// pending (another worker finished it).
    pub(super) fn touch(&mut self) -> Result<()> {
        let mut by_stream: HashMap<String, Vec<String>> = HashMap::new();
        for h in &self.held {
            let names = self.shared.streams.for_key(&h.batch.newest.key);
            by_stream
                .entry(names.stream)
                .or_default()
                .extend(h.batch.ids().cloned());
        }
        let mut still: std::collections::HashSet<(String, String)> =
            std::collections::HashSet::new();
        for (stream, ids) in &by_stream {
            for chunk in ids.chunks(ACK_CHUNK) {
                let claimed: Vec<String> = self.engine.cache.run(|conn| {
                    redis::cmd("XCLAIM")
                        .arg(stream)
                        .arg(GROUP)
                        .arg(&self.consumer)
                        .arg(0)
                        .arg(chunk)
                        .arg("JUSTID")
                        .query(conn)
                })?;
                still.extend(claimed.into_iter().map(|id| (stream.clone(), id)));
            }
        }
        let mut done: Vec<(String, String)> = Vec::new();
        let streams = &self.shared.streams;
        self.held.retain_mut(|h| {
            let stream = streams.for_key(&h.batch.newest.key).stream;
            let pending = |id: &String| still.contains(&(stream.clone(), id.clone()));
            h.batch.older.retain(pending);
            if pending(&h.batch.newest.id) {
                true
            } else {
                // Written (or dead-lettered) by someone else: what is older
                // is superseded by it.
                let key = &h.batch.newest.key;
                done.extend(h.batch.older.drain(..).map(|id| (key.clone(), id)));
                false
            }
        });
        if !done.is_empty() {
            self.ack_keys(done.iter().map(|(key, id)| (key.as_str(), id)))?;
        }
        Ok(())
    }

    /// Deletes consumers that have nothing pending and have not read for
    /// ten claim periods (workers of processes that died). Best effort.
    pub(super) fn sweep_consumers(&self) {
        for state in self.streams.iter().filter(|s| s.ready) {
            self.sweep_consumers_of(&state.names.stream);
        }
    }

    pub(super) fn sweep_consumers_of(&self, stream: &str) {
        let idle_ms = millis(self.shared.claim_after * 10);
        let reply: Result<Value> = self.engine.cache.run(|conn| {
            redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream)
                .arg(GROUP)
                .query(conn)
        });
        let Ok(Value::Array(consumers)) = reply else {
            return;
        };
        for consumer in consumers {
            let info: HashMap<String, Value> = match consumer {
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|kv| match kv {
                        [Value::BulkString(k), v] => {
                            Some((String::from_utf8_lossy(k).into_owned(), v.clone()))
                        }
                        [Value::SimpleString(k), v] => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect(),
                Value::Map(pairs) => pairs
                    .into_iter()
                    .filter_map(|(k, v)| match k {
                        Value::BulkString(k) => Some((String::from_utf8_lossy(&k).into_owned(), v)),
                        Value::SimpleString(k) => Some((k, v)),
                        _ => None,
                    })
                    .collect(),
                _ => continue,
            };
            let (Some(Value::BulkString(name)), Some(Value::Int(pending)), Some(Value::Int(idle))) =
                (info.get("name"), info.get("pending"), info.get("idle"))
            else {
                continue;
            };
            let name = String::from_utf8_lossy(name);
            if *pending == 0 && *idle as u64 >= idle_ms && name != self.consumer {
                let _ = self.engine.cache.run(|conn| {
                    redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(stream)
                        .arg(GROUP)
                        .arg(name.as_ref())
                        .query::<i64>(conn)
                });
            }
        }
    }

    /// On stop: removes this consumer from the group if it holds nothing
    /// (what it holds stays pending for another worker to claim).
    pub(super) fn leave(&mut self) {
        if !self.held.is_empty() {
            return;
        }
        for state in self.streams.iter().filter(|s| s.ready) {
            self.leave_stream(&state.names.stream);
        }
    }

    pub(super) fn leave_stream(&self, stream: &str) {
        let pending: Result<Value> = self.engine.cache.run(|conn| {
            redis::cmd("XPENDING")
                .arg(stream)
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(&self.consumer)
                .query(conn)
        });
        if matches!(pending, Ok(Value::Array(ref items)) if items.is_empty()) {
            let _ = self.engine.cache.run(|conn| {
                redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(stream)
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .query::<i64>(conn)
            });
        }
    }
}
