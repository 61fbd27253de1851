//! Athena, apart from any one query: the generic client ([`client`]) and the SQL text every query
//! over the CloudTrail table shares ([`sql`]). The evidence query lives with the evidence
//! ([`crate::evidence::athena`]), the guard's two queries with the guard's feed
//! ([`crate::feed::athena`]).

pub(crate) mod client;
pub(crate) mod sql;
