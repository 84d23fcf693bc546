//! The physical floor a read is compared with: (1) a raw pooled Redis `GET`
//! of a value the size of the library's cached entry, plus serde_json, and
//! (2) a raw pooled Postgres select by primary key. The hits (3), (4) and
//! (7) are compared with (1), the misses (5) with (1)+(2).

use cacheaside::{Client, UserProfile};

use crate::BoxResult;
use crate::fixture::{USER_ID, check_profile, expected_profile};
use crate::measure::{Baseline, Operation};

/// The floors' Redis key and Postgres query.
pub struct Floors {
    key: String,
    select: String,
}

impl Floors {
    /// Warms the cached profile of [`USER_ID`], then stores the floor's
    /// value under its own key, padded to the cached entry's size.
    pub fn prepare(client: &Client) -> BoxResult<Floors> {
        let expected = expected_profile();
        let key = Client::user_key(USER_ID);
        // Warm the cached profile; then copy its size for the floor's value.
        client.get_user_profile(USER_ID)?;
        let cached_entry: Vec<u8> = client.cache().with_connection(|c| {
            redis::cmd("GET")
                .arg(client.cache().redis_key(&key))
                .query(c)
        })?;
        // The floor's value: the profile's plain JSON, padded with trailing
        // whitespace (valid JSON) to the size of the library's cached entry, so
        // both move the same number of bytes.
        let mut floor_value = serde_json::to_vec(&expected)?;
        floor_value.resize(cached_entry.len().max(floor_value.len()), b' ');
        let floor_key = client.cache().redis_key("floor:profile");
        client.cache().with_connection(|c| {
            redis::cmd("SET")
                .arg(&floor_key)
                .arg(&floor_value)
                .query::<()>(c)
        })?;
        let select = format!(
            "SELECT id, name, email, plan, version FROM {} WHERE id = $1",
            client.users_table()
        );
        eprintln!(
            "bench: hit value {} bytes (cached entry), floor value {} bytes",
            cached_entry.len(),
            floor_value.len()
        );
        Ok(Floors {
            key: floor_key,
            select,
        })
    }

    /// The floors (1) and (2) as operations on `client`.
    pub fn ops<'a>(&'a self, client: &'a Client) -> [Operation<'a>; 2] {
        [
            Operation {
                id: "floor_redis",
                item: "1",
                label: "floor: pooled redis GET + serde_json",
                baseline: Baseline::None,
                call: Box::new(move || {
                    let raw: Vec<u8> = client
                        .cache()
                        .with_connection(|c| redis::cmd("GET").arg(&self.key).query(c))?;
                    check_profile(Some(serde_json::from_slice::<UserProfile>(&raw)?))
                }),
            },
            Operation {
                id: "floor_pg",
                item: "2",
                label: "floor: pooled Postgres PK select",
                baseline: Baseline::None,
                call: Box::new(move || {
                    let row = client.db().query_opt(&self.select, &[&USER_ID])?;
                    check_profile(row.map(|r| UserProfile {
                        id: r.get(0),
                        name: r.get(1),
                        email: r.get(2),
                        plan: r.get(3),
                        version: r.get(4),
                    }))
                }),
            },
        ]
    }
}
