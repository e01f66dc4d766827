//! The stores: where session records live.

#[cfg(all(any(feature = "redis", feature = "postgres"), not(feature = "sync")))]
pub(crate) mod alarm;
pub(crate) mod caching;
pub(crate) mod memory;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod net;
#[cfg(feature = "postgres")]
pub(crate) mod pool;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;
#[cfg(any(feature = "sqlite", feature = "redis", feature = "postgres"))]
pub(crate) mod stored;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod tls;
