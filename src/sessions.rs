//! The shared map user id -> that user's open connections on this node.
//! Only ids live here, never sockets: the loop that owns a connection is
//! named by the id. Writers are the loops (open, close); readers are the
//! delivery path. No lock is held across I/O.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

/// Names one connection: its loop, its slab slot and the slot's
/// generation, so an id left over from a closed connection can never reach
/// the socket that reused the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub worker: u16,
    pub slot: u32,
    pub generation: u32,
}

#[derive(Default)]
pub struct Sessions {
    map: RwLock<HashMap<Box<str>, Vec<ConnId>>>,
}

impl Sessions {
    #[cfg(test)]
    pub fn add(&self, user: &str, id: ConnId) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(user) {
            Some(ids) => ids.push(id),
            None => {
                map.insert(user.into(), vec![id]);
            }
        }
    }

    /// Adds `id` unless `user` already holds `limit` connections here (0:
    /// no limit). The check and the add are one step under the write lock,
    /// so a storm of upgrades of one user spread over every loop cannot
    /// take more than `limit` slots between them.
    pub fn try_add(&self, user: &str, id: ConnId, limit: usize) -> bool {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(user) {
            Some(ids) if limit > 0 && ids.len() >= limit => false,
            Some(ids) => {
                ids.push(id);
                true
            }
            None => {
                map.insert(user.into(), vec![id]);
                true
            }
        }
    }

    /// How many connections `user` holds here.
    pub fn count(&self, user: &str) -> usize {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(user).map_or(0, Vec::len)
    }

    /// The connection count of each user, under one read lock.
    pub fn counts<'a>(&self, users: impl IntoIterator<Item = &'a str>) -> Vec<usize> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        users
            .into_iter()
            .map(|u| map.get(u).map_or(0, Vec::len))
            .collect()
    }

    /// Every user and its connection count (a presence rewrite).
    pub fn snapshot(&self) -> Vec<(Box<str>, usize)> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(u, ids)| (u.clone(), ids.len())).collect()
    }

    pub fn remove(&self, user: &str, id: ConnId) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(ids) = map.get_mut(user) {
            ids.retain(|c| *c != id);
            if ids.is_empty() {
                map.remove(user);
            }
        }
    }

    /// Calls `f` with each connection of each user, under one read lock.
    pub fn for_each<'a>(
        &self,
        users: impl IntoIterator<Item = &'a str>,
        mut f: impl FnMut(ConnId),
    ) {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        for user in users {
            if let Some(ids) = map.get(user) {
                ids.iter().copied().for_each(&mut f);
            }
        }
    }

    pub fn users(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_lookup_remove() {
        let s = Sessions::default();
        let a = ConnId {
            worker: 0,
            slot: 1,
            generation: 1,
        };
        let b = ConnId {
            worker: 1,
            slot: 1,
            generation: 2,
        };
        s.add("42", a);
        s.add("42", b);
        s.add("7", a);
        let mut got = Vec::new();
        s.for_each(["42"], |c| got.push(c));
        assert_eq!(got, vec![a, b]);
        s.remove("42", a);
        s.remove("42", b);
        assert_eq!(s.users(), 1);
    }

    #[test]
    fn try_add_holds_the_per_user_limit_across_threads() {
        let s = std::sync::Arc::new(Sessions::default());
        let threads: Vec<_> = (0..8u16)
            .map(|w| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..100u32)
                        .filter(|&i| {
                            let id = ConnId {
                                worker: w,
                                slot: i,
                                generation: 1,
                            };
                            s.try_add("storm", id, 2)
                        })
                        .count()
                })
            })
            .collect();
        let added: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(added, 2);
        assert_eq!(s.count("storm"), 2);
        assert_eq!(s.counts(["storm", "none"]), vec![2, 0]);
        let unlimited = ConnId {
            worker: 9,
            slot: 9,
            generation: 9,
        };
        assert!(s.try_add("storm", unlimited, 0));
        assert_eq!(s.snapshot(), vec![("storm".into(), 3)]);
    }
}
