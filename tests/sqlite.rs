//! The SQLite store against the real SQLite engine (feature `sqlite`): the store contract, the
//! schema as the original product's monitoring queries read it, and a file reopened.
#![cfg(feature = "sqlite")]

mod common;

use common::sqlite::store;

token_billing::usage_store_conformance!(sqlite_conformance, async { super::store().await });
