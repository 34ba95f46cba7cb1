//! How a multi-node command reaches its nodes: [`Links`] keeps one authenticated
//! connection per peer, opened on first use and reused by every later round of the same
//! command (a snapshot's check, take and commit; a clone's check, prepare and commit), so
//! only the first round pays for connecting and authenticating. A round's calls go to
//! every node at once ([`VolumeService::call_at_once`]). This node is called directly,
//! never through a connection.

use std::collections::BTreeMap;

use control_api::{ApiError, ErrorKind};

use crate::peer::{self, PeerLink, PeerReply, PeerRequest};
use crate::service::VolumeService;

/// The open connections of one command, by node.
#[derive(Default)]
pub(crate) struct Links {
    open: BTreeMap<String, PeerLink>,
}

/// Another node: its link if one is open, and what opening one takes.
struct PeerRoute {
    node: String,
    link: Option<PeerLink>,
    addr: std::net::SocketAddr,
    secret: replication::auth::Secret,
}

impl PeerRoute {
    /// Send `request` (connecting first if there is no link yet); the link comes back
    /// unless the call broke it.
    async fn call(self, request: PeerRequest) -> (Option<PeerLink>, Result<PeerReply, ApiError>) {
        let mut link = match self.link {
            Some(link) => link,
            None => match PeerLink::connect(&self.node, self.addr, &self.secret).await {
                Ok(link) => link,
                Err(e) => return (None, Err(e)),
            },
        };
        let result = link.call(&request).await;
        let broken = matches!(&result, Err(e) if e.kind == ErrorKind::Peer);
        ((!broken).then_some(link), result)
    }
}

impl VolumeService {
    /// How to reach `node`: `None` for this node (called directly).
    fn route(&self, links: &mut Links, node: &str) -> Result<Option<PeerRoute>, ApiError> {
        let config = self.config();
        if node == config.node {
            return Ok(None);
        }
        let Some(entry) = config.node_named(node) else {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("node '{node}' is not in {}", config.path.display()),
            ));
        };
        let Some(secret) = &self.secret else {
            return Err(ApiError::new(
                ErrorKind::Internal,
                "no peer secret loaded; cannot reach other nodes",
            ));
        };
        Ok(Some(PeerRoute {
            node: node.to_string(),
            link: links.open.remove(node),
            addr: entry.control,
            secret: secret.clone(),
        }))
    }

    /// Run one request on `node` through `links`.
    pub(crate) async fn call_node(
        &self,
        links: &mut Links,
        node: &str,
        request: PeerRequest,
    ) -> Result<PeerReply, ApiError> {
        self.call_at_once(links, vec![(node.to_string(), request)])
            .await
            .pop()
            .unwrap_or_else(|| Err(ApiError::new(ErrorKind::Internal, "no answer")))
    }

    /// Open a link to every node of `nodes` that has none, all at once; the first node that
    /// cannot be reached is the error.
    pub(crate) async fn connect(
        &self,
        links: &mut Links,
        nodes: &[String],
    ) -> Result<(), ApiError> {
        let mut tasks = Vec::new();
        for node in nodes {
            match self.route(links, node)? {
                Some(PeerRoute {
                    node,
                    link: Some(link),
                    ..
                }) => {
                    links.open.insert(node, link);
                }
                Some(route) => tasks.push(tokio::spawn(async move {
                    let link = PeerLink::connect(&route.node, route.addr, &route.secret).await;
                    (route.node, link)
                })),
                None => {}
            }
        }
        let mut failure = None;
        for task in tasks {
            match task.await {
                Ok((node, Ok(link))) => {
                    links.open.insert(node, link);
                }
                Ok((_, Err(e))) => failure = failure.or(Some(e)),
                Err(e) => failure = failure.or(Some(task_failed(e))),
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Run every `(node, request)` of `calls` at the same time: the other nodes' calls run
    /// as tasks (each on its link, opened if needed) while this node's runs here. The
    /// answers come in the order of `calls`.
    pub(crate) async fn call_at_once(
        &self,
        links: &mut Links,
        calls: Vec<(String, PeerRequest)>,
    ) -> Vec<Result<PeerReply, ApiError>> {
        let mut answers: Vec<Option<Result<PeerReply, ApiError>>> =
            (0..calls.len()).map(|_| None).collect();
        let mut pending = Vec::new();
        let mut here = Vec::new();
        for (i, (node, request)) in calls.into_iter().enumerate() {
            match self.route(links, &node) {
                Ok(None) => here.push((i, request)),
                Ok(Some(route)) => pending.push((i, node, tokio::spawn(route.call(request)))),
                Err(e) => answers[i] = Some(Err(e)),
            }
        }
        for (i, request) in here {
            // Boxed: a request may call nodes again (this one too), e.g. a take.
            answers[i] = Some(match Box::pin(peer::dispatch(self, request)).await {
                peer::PeerResponse::Ok { result } => Ok(result),
                peer::PeerResponse::Error { error } => Err(error),
            });
        }
        for (i, node, task) in pending {
            answers[i] = Some(match task.await {
                Ok((link, result)) => {
                    if let Some(link) = link {
                        links.open.insert(node, link);
                    }
                    result
                }
                Err(e) => Err(task_failed(e)),
            });
        }
        answers.into_iter().flatten().collect()
    }
}

fn task_failed(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(ErrorKind::Internal, format!("peer call task: {e}"))
}
