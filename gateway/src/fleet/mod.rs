//! A fleet of nodes sharing one configuration through etcd: the client
//! (`etcd`), the document and its local cache (`document`), and what each
//! node publishes about itself (`status`). The daemon's side, which applies
//! documents and keeps the status up, is `control::fleet`.
pub mod document;
pub mod etcd;
pub mod node;
pub mod status;
