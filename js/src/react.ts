/**
 * React bindings: `import { TetherProvider, useQuery, useMutation, useAuth } from "tether-client/react"`.
 * React (18 or later) is an optional peer dependency: only this entry point imports it.
 */
import {
  createContext,
  createElement,
  useCallback,
  useContext,
  useEffect,
  useState,
  useSyncExternalStore,
  type ReactNode,
} from "react";
import type { AuthInfo, TetherClient, TetherError } from "./index.js";

const TetherContext = createContext<TetherClient | null>(null);

/** Makes `client` available to the hooks below. */
export function TetherProvider(props: { client: TetherClient; children?: ReactNode }): ReactNode {
  return createElement(TetherContext.Provider, { value: props.client }, props.children);
}

/** The client of the nearest {@link TetherProvider}. */
export function useTether(): TetherClient {
  const client = useContext(TetherContext);
  if (client === null) throw new Error("useTether/useQuery/useMutation/useAuth need a <TetherProvider>");
  return client;
}

export interface QueryState<T> {
  /** The latest result; `undefined` until the first arrives (or after an error). */
  value: T | undefined;
  error: TetherError | undefined;
  loading: boolean;
}

/**
 * The live result of query `name(args)` with its error and loading state; re-renders on every
 * new result. `args` is compared by value (JSON), so an inline object literal is fine.
 * `args` `"skip"`: no subscription.
 */
export function useQueryState<T = unknown>(name: string, args: Record<string, unknown> | "skip" = {}): QueryState<T> {
  const client = useTether();
  const key = args === "skip" ? null : JSON.stringify(args);
  const [state, setState] = useState<QueryState<T> & { for: string | null }>({
    value: undefined,
    error: undefined,
    loading: key !== null,
    for: null,
  });
  useEffect(() => {
    if (key === null) return undefined;
    const id = `${name}\u0000${key}`;
    setState({ value: undefined, error: undefined, loading: true, for: id });
    return client.subscribe(name, JSON.parse(key) as Record<string, unknown>, (value, error) => {
      setState({ value: error === undefined ? (value as T) : undefined, error, loading: false, for: id });
    });
  }, [client, name, key]);
  const current = key !== null && state.for === `${name}\u0000${key}`;
  return current
    ? { value: state.value, error: state.error, loading: state.loading }
    : { value: undefined, error: undefined, loading: key !== null };
}

/**
 * The live result of query `name(args)`: `undefined` while loading; throws the query's error
 * (a {@link TetherError}) during render, for an error boundary — as Convex's `useQuery` does.
 */
export function useQuery<T = unknown>(name: string, args: Record<string, unknown> | "skip" = {}): T | undefined {
  const { value, error } = useQueryState<T>(name, args);
  if (error !== undefined) throw error;
  return value;
}

/** A stable function that runs mutation `name` exactly once per call. */
export function useMutation<T = unknown>(name: string): (args?: Record<string, unknown>) => Promise<T> {
  const client = useTether();
  return useCallback((args: Record<string, unknown> = {}) => client.mutate(name, args) as Promise<T>, [client, name]);
}

/** The session (`{ state, userId, expiresAt }`), re-rendering when it changes. */
export function useAuth(): AuthInfo {
  const client = useTether();
  return useSyncExternalStore(
    useCallback((onChange: () => void) => client.onAuthChange(onChange), [client]),
    () => client.auth,
    () => client.auth,
  );
}
