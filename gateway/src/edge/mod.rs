//! Where clients meet the gateway: the listeners at run time (`listener`),
//! accepting TCP clients and adopting handed-over flows (`proxy`), HTTP and
//! the WebSocket upgrade (`http`), HTTP/2 and its WebSocket streams (`h2`),
//! and carrying a connected flow on the kernel path or the relay (`carry`). Flows reach the daemon only through
//! `plane::Plane`.
pub mod authz;
pub mod carry;
pub mod h2;
pub mod http;
pub mod listener;
pub mod plane;
pub mod proxy;
pub mod proxy_header;
