//! The token-minting routes: rate limit, validate, mint with CDP, redirect.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::client_ip::ClientIp;
use crate::error::GatewayError;
use crate::metrics::Route;

pub struct Minter {}

impl Minter {
    pub async fn handle(&self, req: Request<Incoming>, _route: Route, _client: ClientIp) -> Response<ResponseBody> {
        GatewayError::MintingNotConfigured.into_response(req.headers())
    }
}
