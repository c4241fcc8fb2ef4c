//! Everything the agent says over a network or socket: the operators' Unix-socket API
//! ([`operator_api`], which `kycctl` calls), the HTTPS API the collector polls
//! ([`collector_api`]) with its pre-serialised host statement ([`statement`]), the policy
//! fetcher ([`policy_fetch`]) and the one outbound HTTPS client builder they and the
//! uploader share ([`client`]). What the requests mean is decided by the daemon's main loop;
//! these modules own the transport, authentication and the wire shapes.

pub mod client;
pub mod collector_api;
pub mod operator_api;
pub mod policy_fetch;
pub mod statement;
