//! ListContainers and ListPodSandbox, kubelet's relist calls, answered from
//! the CRI message of each record encoded once.
//!
//! kubelet asks for every container and every pod each second. Built anew
//! per call, the answer at 1000 containers was 1000 `Container`s with their
//! strings and label maps cloned, then encoded and dropped: most of the
//! call's time went to malloc, free and the response buffer's growth
//! (docs/performance.md, session 6). Records are immutable `Arc`s, replaced
//! whenever they change, so a record's encoding is made once, when it is
//! first listed, and kept while the record is the current one.
//!
//! The generated service can only send the generated response types, so
//! `RuntimeServer` (service.rs) hands these two paths to [`ListCall`], which
//! answers in gRPC's framing itself: the kept answer goes out as a body
//! frame as it is, where tonic's encoder would copy it into its buffer.
//! Both responses have their list in field 1, which is what [`EncodedList`]
//! holds, behind gRPC's message prefix.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use k8s_cri::v1::{
    ContainerFilter, ListContainersRequest, ListContainersResponse, ListPodSandboxRequest,
    ListPodSandboxResponse, PodSandboxFilter,
};
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, http};

use super::{container, sandbox};
use crate::container::ContainerRecord;
use crate::daemon::Daemon;
use crate::sandbox::PodRecord;

const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";
const LIST_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/ListPodSandbox";

/// A list response in its wire form, framed: gRPC's message prefix, then
/// the items, each as field 1 (`ListContainersResponse` and
/// `ListPodSandboxResponse` alike). The prefix is made with the answer so
/// that the answer goes out as one DATA frame. As a frame of its own it
/// left an empty second frame for an empty list, and h2 clients close the
/// connection after 100 empty frames (h2 0.4.20's
/// `MAX_RECV_EMPTY_DATA_FRAMES`): a node without pods lost its client's
/// connection within a minute of kubelet's relists.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedList(Bytes);

impl EncodedList {
    /// Frames `body`, which starts with [`PREFIX`] bytes kept for the
    /// prefix. A message too long for the prefix's length keeps a zero
    /// prefix; [`grpc_response`] refuses to send it.
    fn framed(mut body: BytesMut) -> EncodedList {
        let len = u32::try_from(body.len() - PREFIX).unwrap_or(0);
        body[1..PREFIX].copy_from_slice(&len.to_be_bytes());
        EncodedList(body.freeze())
    }

    /// The response message, without the prefix.
    fn message(&self) -> &[u8] {
        &self.0[PREFIX..]
    }
}

/// The encoded CRI message of each record that has been listed, keyed by
/// the record's address, and the last whole answer. An entry holds its
/// record, so the address cannot be reused by another record while the
/// entry is there.
pub struct Encodings<R> {
    state: Mutex<EncodingsState<R>>,
}

struct EncodingsState<R> {
    entries: HashMap<usize, (Arc<R>, Bytes)>,
    /// The last answer to a call without a filter, with the records it was
    /// made of: kubelet's relist asks the same again and again.
    last: Option<(Vec<Arc<R>>, EncodedList)>,
}

/// Entries above the number of records listed before a sweep of the
/// replaced and removed ones.
const SLACK: usize = 64;

impl<R> Encodings<R> {
    pub fn new() -> Self {
        Encodings {
            state: Mutex::new(EncodingsState {
                entries: HashMap::new(),
                last: None,
            }),
        }
    }

    /// The answer made of `records`, in order; `encode` makes the encodings
    /// missing. `unfiltered`: `records` are every record there is, the
    /// answer worth keeping for the next call.
    pub fn of(
        &self,
        records: &[Arc<R>],
        unfiltered: bool,
        encode: impl Fn(&R) -> Bytes,
    ) -> EncodedList {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if unfiltered
            && let Some((made_of, answer)) = &state.last
            && made_of.len() == records.len()
            && made_of.iter().zip(records).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            return answer.clone();
        }
        let mut body = BytesMut::zeroed(PREFIX);
        for record in records {
            let key = Arc::as_ptr(record) as usize;
            let (_, item) = state
                .entries
                .entry(key)
                .or_insert_with(|| (record.clone(), encode(record)));
            prost::encoding::bytes::encode(1, item, &mut body);
        }
        let answer = EncodedList::framed(body);
        if unfiltered {
            state.last = Some((records.to_vec(), answer.clone()));
        }
        // A record replaced or removed is held by its entry alone (and by
        // the last answer's list until that is replaced).
        if state.entries.len() > 2 * records.len() + SLACK {
            state
                .entries
                .retain(|_, (record, _)| Arc::strong_count(record) > 1);
        }
        answer
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }
}

/// The two list calls over the kept encodings.
pub struct Lists {
    daemon: Arc<Daemon>,
    containers: Encodings<ContainerRecord>,
    pods: Encodings<PodRecord>,
}

impl Lists {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Lists {
            daemon,
            containers: Encodings::new(),
            pods: Encodings::new(),
        }
    }

    pub async fn containers(&self, filter: Option<ContainerFilter>) -> Result<EncodedList, Status> {
        let unfiltered = filter
            .as_ref()
            .is_none_or(|f| *f == ContainerFilter::default());
        let listed = container::list(&self.daemon.containers, filter).await?;
        Ok(self.containers.of(&listed, unfiltered, |c| {
            container::to_cri(c).encode_to_vec().into()
        }))
    }

    pub async fn pods(&self, filter: Option<PodSandboxFilter>) -> Result<EncodedList, Status> {
        let unfiltered = filter
            .as_ref()
            .is_none_or(|f| *f == PodSandboxFilter::default());
        let listed = sandbox::list(&self.daemon.sandboxes, filter).await?;
        Ok(self.pods.of(&listed, unfiltered, |pod| {
            sandbox::to_cri(pod).encode_to_vec().into()
        }))
    }

    /// ListContainers as the generated message type, for the generated
    /// service's method.
    pub async fn containers_decoded(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<ListContainersResponse, Status> {
        decode(&self.containers(filter).await?)
    }

    /// ListPodSandbox as the generated message type.
    pub async fn pods_decoded(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> Result<ListPodSandboxResponse, Status> {
        decode(&self.pods(filter).await?)
    }
}

fn decode<M: Message + Default>(encoded: &EncodedList) -> Result<M, Status> {
    M::decode(encoded.message())
        .map_err(|e| Status::internal(format!("decoding a kept list encoding: {e}")))
}

/// The two calls answered here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListCall {
    Containers,
    PodSandbox,
}

impl ListCall {
    /// The list call of a request's path, if it is one.
    pub fn of(path: &str) -> Option<ListCall> {
        match path {
            LIST_CONTAINERS => Some(ListCall::Containers),
            LIST_POD_SANDBOX => Some(ListCall::PodSandbox),
            _ => None,
        }
    }

    /// Answers `request`: its one message decoded, the kept encodings
    /// sent as they are, in gRPC's framing.
    pub fn serve(
        self,
        lists: &Arc<Lists>,
        request: http::Request<Body>,
    ) -> BoxFuture<http::Response<Body>, Infallible> {
        let lists = lists.clone();
        Box::pin(async move {
            Ok(match self.answer(&lists, request.into_body()).await {
                Ok(answer) => grpc_response(answer),
                Err(status) => status.into_http(),
            })
        })
    }

    async fn answer(self, lists: &Lists, body: Body) -> Result<EncodedList, Status> {
        let message = read_message(body).await?;
        match self {
            ListCall::Containers => {
                let request: ListContainersRequest = decode_request(&message)?;
                lists.containers(request.filter).await
            }
            ListCall::PodSandbox => {
                let request: ListPodSandboxRequest = decode_request(&message)?;
                lists.pods(request.filter).await
            }
        }
    }
}

/// The largest request taken, as tonic's default.
const MAX_REQUEST: usize = 4 << 20;
/// gRPC's message prefix: a compressed flag and a big-endian length.
const PREFIX: usize = 5;

/// The one message of a unary request's body. Compression is not offered
/// (no `grpc-accept-encoding`), so a compressed message is refused, as
/// tonic does.
async fn read_message(body: Body) -> Result<Bytes, Status> {
    let bytes = Limited::new(body, MAX_REQUEST)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("reading the request: {e}")))?
        .to_bytes();
    let Some((prefix, message)) = bytes.split_first_chunk::<PREFIX>() else {
        return Err(Status::invalid_argument("the request has no message"));
    };
    if prefix[0] != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not accepted",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    if usize::try_from(len).ok() != Some(message.len()) {
        return Err(Status::invalid_argument(format!(
            "the request's message is {} bytes, its prefix says {len}",
            message.len()
        )));
    }
    Ok(bytes.slice(PREFIX..))
}

fn decode_request<Q: Message + Default>(message: &[u8]) -> Result<Q, Status> {
    Q::decode(message).map_err(|e| Status::invalid_argument(format!("decoding the request: {e}")))
}

/// A successful unary response carrying `answer`. The answer's bytes are
/// the body's frame as they are: h2 writes them from there.
fn grpc_response(answer: EncodedList) -> http::Response<Body> {
    if u32::try_from(answer.message().len()).is_err() {
        return Status::resource_exhausted("the answer is larger than gRPC can frame").into_http();
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [Frame::data(answer.0), Frame::trailers(trailers)];
    let body = StreamBody::new(futures_util::stream::iter(frames.map(Ok::<_, Infallible>)));
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use k8s_cri::v1::{Container, PodSandbox};

    use super::*;

    fn encode_name(name: &String) -> Bytes {
        Bytes::copy_from_slice(name.as_bytes())
    }

    /// The answer's items, as they were encoded.
    fn items(answer: &EncodedList) -> Vec<String> {
        #[derive(Clone, PartialEq, prost::Message)]
        struct Items {
            #[prost(string, repeated, tag = "1")]
            items: Vec<String>,
        }
        Items::decode(answer.message()).expect("decodes").items
    }

    #[test]
    fn a_record_is_encoded_once_while_it_is_current() {
        let encodings = Encodings::new();
        let (a, b) = (Arc::new("a".to_string()), Arc::new("b".to_string()));
        let calls = Cell::new(0);
        let counted = |name: &String| {
            calls.set(calls.get() + 1);
            encode_name(name)
        };
        let first = encodings.of(&[a.clone(), b.clone()], true, counted);
        assert_eq!(items(&first), ["a", "b"]);
        // A filtered answer is made of the same encodings.
        let filtered = encodings.of(std::slice::from_ref(&b), false, counted);
        assert_eq!(items(&filtered), ["b"]);
        assert_eq!(calls.get(), 2);

        // A changed record is a new Arc: encoded again.
        let a2 = Arc::new("a2".to_string());
        let third = encodings.of(&[a2.clone(), b.clone()], true, counted);
        assert_eq!(calls.get(), 3);
        assert_eq!(items(&third), ["a2", "b"]);
    }

    #[test]
    fn the_last_unfiltered_answer_is_kept_while_its_records_are_current() {
        let encodings = Encodings::new();
        let (a, b) = (Arc::new("a".to_string()), Arc::new("b".to_string()));
        let first = encodings.of(&[a.clone(), b.clone()], true, encode_name);
        let again = encodings.of(&[a.clone(), b.clone()], true, encode_name);
        assert_eq!(first.0.as_ptr(), again.0.as_ptr(), "not the kept answer");

        // A filtered call neither uses nor replaces it.
        let filtered = encodings.of(&[a.clone(), b.clone()], false, encode_name);
        assert_ne!(filtered.0.as_ptr(), first.0.as_ptr());
        let still = encodings.of(&[a.clone(), b.clone()], true, encode_name);
        assert_eq!(still.0.as_ptr(), first.0.as_ptr());

        // One record replaced, or one gone: a new answer.
        let b2 = Arc::new("b".to_string());
        let changed = encodings.of(&[a.clone(), b2.clone()], true, encode_name);
        assert_ne!(changed.0.as_ptr(), first.0.as_ptr());
        assert_eq!(items(&changed), ["a", "b"]);
        let fewer = encodings.of(std::slice::from_ref(&a), true, encode_name);
        assert_eq!(items(&fewer), ["a"]);
        let none = encodings.of(&[], true, encode_name);
        assert!(items(&none).is_empty());
    }

    #[test]
    fn entries_of_records_gone_are_swept() {
        let encodings = Encodings::new();
        let kept = Arc::new("kept".to_string());
        for i in 0..(SLACK + 10) {
            let gone = Arc::new(format!("gone {i}"));
            encodings.of(&[kept.clone(), gone], false, encode_name);
        }
        // Swept whenever more than 2 × 2 + SLACK entries: never above that,
        // and the record still alive is kept.
        assert!(encodings.len() <= 2 * 2 + SLACK + 1, "{}", encodings.len());
        encodings.of(std::slice::from_ref(&kept), false, |_| {
            panic!("kept was encoded again")
        });
    }

    #[test]
    fn an_answer_is_the_wire_form_of_both_list_responses() {
        let containers = vec![
            Container {
                id: "one".into(),
                labels: [("k".to_string(), "v".to_string())].into(),
                ..Default::default()
            },
            Container {
                id: "two".into(),
                state: 1,
                ..Default::default()
            },
        ];
        let records: Vec<_> = containers.iter().cloned().map(Arc::new).collect();
        let answer = Encodings::new().of(&records, true, |c: &Container| c.encode_to_vec().into());
        let decoded: ListContainersResponse = decode(&answer).expect("decodes");
        assert_eq!(decoded.containers, containers);
        assert_eq!(
            answer.message(),
            ListContainersResponse { containers }.encode_to_vec()
        );

        let pods = vec![PodSandbox {
            id: "pod".into(),
            created_at: 7,
            ..Default::default()
        }];
        let records: Vec<_> = pods.iter().cloned().map(Arc::new).collect();
        let answer = Encodings::new().of(&records, true, |p: &PodSandbox| p.encode_to_vec().into());
        let decoded: ListPodSandboxResponse = decode(&answer).expect("decodes");
        assert_eq!(decoded.items, pods);
    }

    /// A request body in gRPC's framing: `flag`, the length, `message`.
    fn framed(flag: u8, len: u32, message: &[u8]) -> Body {
        let mut bytes = vec![flag];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(message);
        Body::new(http_body_util::Full::new(Bytes::from(bytes)))
    }

    #[tokio::test]
    async fn a_request_is_read_from_its_grpc_framing() {
        let request = ListContainersRequest {
            filter: Some(ContainerFilter {
                id: "abc".into(),
                ..Default::default()
            }),
        };
        let message = request.encode_to_vec();
        let len = u32::try_from(message.len()).expect("small");
        let read = read_message(framed(0, len, &message)).await.expect("reads");
        assert_eq!(
            decode_request::<ListContainersRequest>(&read).expect("decodes"),
            request
        );

        let compressed = read_message(framed(1, len, &message))
            .await
            .expect_err("compressed");
        assert_eq!(compressed.code(), tonic::Code::Unimplemented);
        let short = read_message(framed(0, len + 1, &message))
            .await
            .expect_err("short");
        assert_eq!(short.code(), tonic::Code::InvalidArgument);
        let empty = read_message(Body::empty()).await.expect_err("no message");
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    }

    /// The body's frames: the data frames' bytes, and the trailers.
    async fn frames(response: http::Response<Body>) -> (Vec<Bytes>, Option<http::HeaderMap>) {
        let mut body = response.into_body();
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("frame");
            match frame.into_data() {
                Ok(bytes) => data.push(bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn an_answer_goes_out_in_one_grpc_frame_with_status_ok() {
        let names = [Arc::new("x".to_string())];
        for listed in [&names[..], &[]] {
            let answer = Encodings::new().of(listed, true, encode_name);
            let response = grpc_response(answer.clone());
            assert_eq!(
                response.headers()[http::header::CONTENT_TYPE],
                "application/grpc"
            );
            let (data, trailers) = frames(response).await;
            // Also for an empty list: no empty frame, which h2 clients count.
            assert_eq!(data.len(), 1, "{data:?}");
            let len = u32::try_from(answer.message().len()).expect("small");
            assert_eq!(data[0][0], 0, "not compressed");
            assert_eq!(data[0][1..PREFIX], len.to_be_bytes());
            assert_eq!(&data[0][PREFIX..], answer.message());
            assert_eq!(
                trailers.as_ref().and_then(|t| t.get("grpc-status")),
                Some(&http::HeaderValue::from_static("0"))
            );
        }
    }
}
