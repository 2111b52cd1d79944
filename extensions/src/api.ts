/**
 * Typed client for the server extension's REST API under /workbench/api/ (workbench/server/handlers.py).
 * Every request goes through ServerConnection, which adds the token and XSRF header the server requires.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One trace store in the listing (discovery.py `_listing_entry`). */
export interface IStoreEntry {
  path: string;
  name: string;
  model: string;
  tokens: number;
  layers: number;
  experts: number;
  created: string | null;
  complete: boolean;
  schema_version: string | null;
}

/** A folder or store the server could not read; listed instead of failing the whole listing. */
export interface IStoreError {
  path: string;
  error: string;
}

export interface IListing {
  stores: IStoreEntry[];
  errors: IStoreError[];
}

/** Expert load binned to a bounded grid: cells[row][col] is load relative to a uniform router (1 = balanced). */
export interface ILoadPicture {
  rows: [number, number][]; // first and last MoE layer in each row
  cols: [number, number][]; // first and last expert in each column
  cells: number[][]; // [rows, cols]
  max: number;
}

export interface ISummary extends IStoreEntry {
  moe_layers: number[];
  sampled_tokens: number;
  load_picture: ILoadPicture;
}

export type NotebookKind = 'analysis' | 'workbench' | 'live';

export interface INotebookRequest {
  kind: NotebookKind;
  store?: string; // for 'analysis' and 'workbench'
  dir?: string; // for 'live'
}

/** An error reply from the server, carrying its `{"error": ...}` message so the user sees what went wrong. */
export class WorkbenchAPIError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
    this.name = 'WorkbenchAPIError';
  }
}

function parseJSON(text: string): unknown {
  try {
    return text ? (JSON.parse(text) as unknown) : null;
  } catch {
    return null; // an HTML error page from a proxy: reported through the status text below
  }
}

async function requestAPI<T>(
  endPoint: string,
  init: RequestInit = {},
  query: Record<string, string> = {}
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const search = URLExt.objectToQueryString(query);
  const url = URLExt.join(settings.baseUrl, 'workbench', 'api', endPoint) + search;
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  const data = parseJSON(text);
  if (!response.ok) {
    const detail =
      data !== null && typeof data === 'object' && 'error' in data
        ? String(data.error)
        : text || response.statusText;
    throw new WorkbenchAPIError(response.status, `${response.status}: ${detail}`);
  }
  return data as T;
}

export function listStores(dir = ''): Promise<IListing> {
  return requestAPI<IListing>('traces', {}, dir ? { path: dir } : {});
}

export function fetchSummary(store: string): Promise<ISummary> {
  return requestAPI<ISummary>('traces/summary', {}, { path: store });
}

/** Ask the server to write a notebook (it never overwrites); resolves to the new notebook's path. */
export async function createNotebook(request: INotebookRequest): Promise<string> {
  const reply = await requestAPI<{ path: string }>('notebooks', {
    method: 'POST',
    body: JSON.stringify(request)
  });
  return reply.path;
}
