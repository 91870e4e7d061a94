//! A small echo backend for the demo and for trying a config out: echoes every
//! byte, forwards half-close, and can greet first like SMTP or MySQL servers.
use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::info;

pub async fn run(bind: SocketAddr, greeting: Option<String>) -> std::io::Result<()> {
    let l = TcpListener::bind(bind).await?;
    info!("echo backend listening on {}", l.local_addr()?);
    loop {
        let (mut s, peer) = l.accept().await?;
        let greeting = greeting.clone();
        tokio::spawn(async move {
            if let Some(g) = greeting {
                if s.write_all(format!("{g}\r\n").as_bytes()).await.is_err() {
                    return;
                }
            }
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => {
                        let _ = s.shutdown().await;
                        break;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        total += n as u64;
                    }
                    Err(_) => break,
                }
            }
            info!(%peer, bytes = total, "echo connection closed");
        });
    }
}
