/**
 * Tether's browser client: `import { TetherClient } from "/tether.js"` (contract §6).
 */
export { TetherClient } from "./client.js";
export type {
  AuthInfo,
  ConnectionState,
  FetchToken,
  MutateOptions,
  QueryCallback,
  TetherClientOptions,
} from "./client.js";
export { TetherError } from "./errors.js";
export type { RefreshMode } from "./session.js";
export { ClientErrorCode, CloseCode, ErrorCode, AuthErrorCode, PROTOCOL_VERSION } from "./protocol.js";
