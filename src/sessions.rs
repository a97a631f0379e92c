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
    pub fn add(&self, user: &str, id: ConnId) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(user) {
            Some(ids) => ids.push(id),
            None => {
                map.insert(user.into(), vec![id]);
            }
        }
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
}
