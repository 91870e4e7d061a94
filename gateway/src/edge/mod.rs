//! Where clients meet the gateway: the listeners at run time (`listener`),
//! accepting TCP clients and adopting handed-over flows (`proxy`), HTTP and
//! the WebSocket upgrade (`http`), and carrying a connected flow on the
//! kernel path or the relay (`carry`). Flows reach the daemon only through
//! `plane::Plane`.
pub mod authz;
pub mod carry;
pub mod http;
pub mod listener;
pub mod plane;
pub mod proxy;
pub mod proxy_header;
