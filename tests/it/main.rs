//! Integration tests: real sockets, a real upstream app, real Redis.
//! One test binary (one link) with a module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod arch;
mod auth;
mod cluster;
mod common;
mod example;
mod hardening;
mod history;
mod lifecycle;
mod limits;
mod lives;
mod proxy;
mod redis_cluster;
mod relay;
mod sentinel;
mod socketio;
mod socketio_app;
mod socketio_binary;
mod socketio_conformance;
mod socketio_hardening;
