//! The rendezvous store of a multi-process world: a small key–value server over TCP that
//! rank 0 hosts at `MASTER_ADDR:MASTER_PORT` (as torchrun's `TCPStore`), through which the
//! ranks find each other (and, on GPUs, share the NCCL unique id).
//!
//! Three operations, each with a deadline: [`StoreClient::set_once`] (a key may be written
//! once: a second writer is told, so two processes with the same `RANK` are caught),
//! [`StoreClient::get`] (blocks until the key exists or the deadline passes) and
//! [`StoreClient::add`] (an atomic counter, for barriers).
//!
//! Wire format (little-endian), one request then one reply per round trip:
//! request `op: u8, key_len: u32, key, value_len: u64, value, wait_ms: u64`;
//! reply `status: u8` (0 ok, 1 exists / not there in time), then for `get` and `add` the
//! value `len: u64, bytes`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const OP_SET_ONCE: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
/// Largest key or value the server accepts (a guard against a stray client's garbage).
const MAX_LEN: u64 = 1 << 20;

#[derive(Default)]
struct Table {
    values: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// The server: rank 0's process hosts it for as long as the value lives.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreServer").field("addr", &self.addr).finish()
    }
}

impl StoreServer {
    /// Listens on `addr` (port 0: any free port, see [`addr`](StoreServer::addr)).
    ///
    /// # Errors
    /// The address cannot be bound (in use, not this machine's).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::new(Table::default());
        let flag = stop.clone();
        let accept =
            std::thread::Builder::new().name("rendezvous-store".into()).spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let table = table.clone();
                            let flag = flag.clone();
                            // A client that misbehaves only ends its own connection.
                            let _ = std::thread::Builder::new()
                                .name("rendezvous-client".into())
                                .spawn(move || serve(stream, &table, &flag));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })?;
        Ok(StoreServer { addr, stop, accept: Some(accept) })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve(mut stream: TcpStream, table: &Table, stop: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_nonblocking(false);
    loop {
        let Ok((op, key, value, wait)) = read_request(&mut stream) else { return };
        let reply = match op {
            OP_SET_ONCE => {
                let mut values = table.values.lock().unwrap_or_else(|e| e.into_inner());
                let status = match values.entry(key) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(value);
                        0
                    }
                    std::collections::hash_map::Entry::Occupied(_) => 1,
                };
                drop(values);
                table.changed.notify_all();
                vec![status]
            }
            OP_GET => {
                let deadline = Instant::now() + wait;
                let mut values = table.values.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(v) = values.get(&key) {
                        break with_value(v);
                    }
                    let now = Instant::now();
                    if now >= deadline || stop.load(Ordering::Relaxed) {
                        break vec![1];
                    }
                    let slice = (deadline - now).min(Duration::from_millis(50));
                    values = table
                        .changed
                        .wait_timeout(values, slice)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            OP_ADD => {
                let delta = value
                    .get(..8)
                    .map_or(0, |b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
                let mut values = table.values.lock().unwrap_or_else(|e| e.into_inner());
                let old = values
                    .get(&key)
                    .and_then(|v| v.get(..8))
                    .map_or(0, |b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
                let new = old.wrapping_add(delta);
                values.insert(key, new.to_le_bytes().to_vec());
                drop(values);
                table.changed.notify_all();
                with_value(&new.to_le_bytes())
            }
            _ => return,
        };
        if stream.write_all(&reply).is_err() {
            return;
        }
    }
}

fn with_value(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + v.len());
    out.push(0);
    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
    out.extend_from_slice(v);
    out
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_bytes(r: &mut impl Read, len: u64) -> io::Result<Vec<u8>> {
    if len > MAX_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{len} bytes is too long")));
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn read_request(r: &mut impl Read) -> io::Result<(u8, String, Vec<u8>, Duration)> {
    let mut op = [0u8; 1];
    r.read_exact(&mut op)?;
    let mut kl = [0u8; 4];
    r.read_exact(&mut kl)?;
    let key = read_bytes(r, u64::from(u32::from_le_bytes(kl)))?;
    let key = String::from_utf8(key)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a key that is not UTF-8"))?;
    let vl = read_u64(r)?;
    let value = read_bytes(r, vl)?;
    let wait = Duration::from_millis(read_u64(r)?);
    Ok((op[0], key, value, wait))
}

/// A connection to the store.
#[derive(Debug)]
pub struct StoreClient {
    stream: TcpStream,
    addr: SocketAddr,
}

impl StoreClient {
    /// Connects to the store at `addr`, retrying until `deadline` (rank 0 may start later
    /// than the others).
    ///
    /// # Errors
    /// No store answered at `addr` before the deadline: the last connection error.
    pub fn connect(addr: SocketAddr, deadline: Instant) -> io::Result<Self> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(
                &addr,
                left.clamp(Duration::from_millis(1), Duration::from_secs(1)),
            ) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(StoreClient { stream, addr });
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The address of the store.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This end's local address: the interface through which this machine reaches the store
    /// (the address other ranks can reach this one at).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    fn request(&mut self, op: u8, key: &str, value: &[u8], wait: Duration) -> io::Result<u8> {
        let mut msg = Vec::with_capacity(21 + key.len() + value.len());
        msg.push(op);
        msg.extend_from_slice(&(key.len() as u32).to_le_bytes());
        msg.extend_from_slice(key.as_bytes());
        msg.extend_from_slice(&(value.len() as u64).to_le_bytes());
        msg.extend_from_slice(value);
        msg.extend_from_slice(&(wait.as_millis() as u64).to_le_bytes());
        // The server answers within `wait`; a store that does not answer a second after that
        // is gone.
        self.stream.set_read_timeout(Some(wait + Duration::from_secs(5)))?;
        self.stream.write_all(&msg)?;
        let mut status = [0u8; 1];
        self.stream.read_exact(&mut status)?;
        Ok(status[0])
    }

    /// Writes `key` unless it exists: `Ok(false)` when another client wrote it first.
    ///
    /// # Errors
    /// The store is unreachable.
    pub fn set_once(&mut self, key: &str, value: &[u8]) -> io::Result<bool> {
        Ok(self.request(OP_SET_ONCE, key, value, Duration::ZERO)? == 0)
    }

    /// The value of `key`, waiting up to `wait` for it to be written; `None` if it was not.
    ///
    /// # Errors
    /// The store is unreachable.
    pub fn get(&mut self, key: &str, wait: Duration) -> io::Result<Option<Vec<u8>>> {
        if self.request(OP_GET, key, &[], wait)? != 0 {
            return Ok(None);
        }
        let len = read_u64(&mut self.stream)?;
        Ok(Some(read_bytes(&mut self.stream, len)?))
    }

    /// Adds `delta` to the counter `key` (0 when new); its new value.
    ///
    /// # Errors
    /// The store is unreachable.
    pub fn add(&mut self, key: &str, delta: i64) -> io::Result<i64> {
        self.request(OP_ADD, key, &delta.to_le_bytes(), Duration::ZERO)?;
        let len = read_u64(&mut self.stream)?;
        let v = read_bytes(&mut self.stream, len)?;
        Ok(v.get(..8).map_or(0, |b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().expect("an address")
    }

    #[test]
    fn set_once_get_and_add_round_trip() {
        let server = StoreServer::bind(local()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut a = StoreClient::connect(server.addr(), deadline).unwrap();
        let mut b = StoreClient::connect(server.addr(), deadline).unwrap();
        assert!(a.set_once("rank/0", b"hello").unwrap());
        assert!(!b.set_once("rank/0", b"again").unwrap(), "a key is written once");
        assert_eq!(b.get("rank/0", Duration::ZERO).unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(b.get("rank/1", Duration::from_millis(50)).unwrap(), None);
        assert_eq!(a.add("n", 2).unwrap(), 2);
        assert_eq!(b.add("n", 3).unwrap(), 5);
    }

    #[test]
    fn get_waits_for_a_later_writer() {
        let server = StoreServer::bind(local()).unwrap();
        let addr = server.addr();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut c =
                StoreClient::connect(addr, Instant::now() + Duration::from_secs(5)).unwrap();
            c.set_once("late", b"x").unwrap();
        });
        let mut c = StoreClient::connect(addr, Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(c.get("late", Duration::from_secs(5)).unwrap().as_deref(), Some(&b"x"[..]));
        writer.join().unwrap();
    }

    #[test]
    fn a_second_server_on_the_same_port_is_refused() {
        let server = StoreServer::bind(local()).unwrap();
        let e = StoreServer::bind(server.addr()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    }
}
