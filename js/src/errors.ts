/**
 * The one error class of the client. `code` is a wire code (`unauthenticated`, `invalid`,
 * `refresh_reused`, an application's own code …) or one of the client's own
 * (`network`, `outcome_unknown`, `closed`, `message_too_large`; see `ClientErrorCode`).
 */
export class TetherError extends Error {
  override readonly name = "TetherError";

  constructor(
    readonly code: string,
    message: string,
    /** The `requestId` of a mutation whose outcome is unknown: re-send it with this id. */
    readonly requestId?: number,
    /** Seconds to wait before trying again, when the server said (`Retry-After`). */
    readonly retryAfter?: number,
  ) {
    super(message);
  }
}
