/**
 * The "MoE Workbench" left sidebar: the trace stores under the server root with their metadata and expert-load
 * picture, a filter box, refresh, and per-store actions. Actions run through commands (ids in commands.ts), so
 * the same operations are reachable from the palette and scripts.
 */
import { CommandRegistry } from '@lumino/commands';
import { Widget } from '@lumino/widgets';

import { fetchSummary, IListing, IStoreEntry, ISummary, listStores } from './api';
import { CommandIDs } from './commands';
import { renderLoadPicture } from './loadPicture';

const SUMMARY_CONCURRENCY = 4; // summaries read up to 50k tokens each on the server: a few at a time

/** True when every whitespace-separated word of `query` occurs in the store's name, path or model. */
export function matchesFilter(store: IStoreEntry, query: string): boolean {
  const haystack = `${store.name} ${store.path} ${store.model}`.toLowerCase();
  return query
    .toLowerCase()
    .split(/\s+/)
    .filter(word => word.length > 0)
    .every(word => haystack.includes(word));
}

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function formatCreated(created: string | null): string {
  if (!created) {
    return 'created: unknown';
  }
  const date = new Date(created);
  return Number.isNaN(date.getTime()) ? `created: ${created}` : `created ${date.toLocaleString()}`;
}

export class TraceBrowser extends Widget {
  constructor(private readonly _commands: CommandRegistry) {
    super();
    this.id = 'moe-workbench-sidebar';
    this.addClass('wbl-sidebar');
    this.title.caption = 'MoE Workbench: trace stores';

    const header = element('div', 'wbl-header');
    header.append(element('h2', 'wbl-title', 'MoE Workbench'));
    const refresh = element('button', 'jp-Button wbl-refresh', 'Refresh');
    refresh.title = 'List the trace stores again';
    refresh.addEventListener('click', () => void this.refresh());
    const live = element('button', 'jp-Button wbl-new-live', 'New live workbench');
    live.title = 'Create a notebook with the dashboard on the default model';
    live.addEventListener('click', () => void this._commands.execute(CommandIDs.newLive));
    header.append(refresh, live);

    this._filter = element('input', 'jp-mod-styled wbl-filter');
    this._filter.type = 'search';
    this._filter.placeholder = 'Filter stores';
    this._filter.title = 'Show the stores whose name, path or model contains every word typed';
    this._filter.setAttribute('aria-label', 'Filter trace stores');
    this._filter.addEventListener('input', () => this._applyFilter());

    this._status = element('div', 'wbl-status', 'Not loaded yet');
    this._status.setAttribute('role', 'status');
    this._list = element('ul', 'wbl-store-list');
    this._errors = element('ul', 'wbl-error-list');
    this.node.append(header, this._filter, this._status, this._list, this._errors);
  }

  /** Fetch the listing again; summaries are re-read only for stores whose tokens or creation time changed. */
  async refresh(): Promise<void> {
    this._status.textContent = 'Loading trace stores…';
    let listing: IListing;
    try {
      listing = await listStores();
    } catch (err) {
      this._status.textContent = `Cannot list trace stores: ${err instanceof Error ? err.message : String(err)}`;
      this._status.classList.add('wbl-mod-error');
      return;
    }
    this._status.classList.remove('wbl-mod-error');
    this._stores = listing.stores;
    this._list.replaceChildren(...listing.stores.map(store => this._item(store)));
    this._errors.replaceChildren(
      ...listing.errors.map(e => {
        const li = element('li', 'wbl-store-error', `${e.path || '(root)'}: ${e.error}`);
        li.dataset.path = e.path;
        return li;
      })
    );
    this._applyFilter();
    void this._loadSummaries(listing.stores);
  }

  private _applyFilter(): void {
    const query = this._filter.value;
    let shown = 0;
    for (const li of Array.from(this._list.children) as HTMLElement[]) {
      const store = this._stores.find(s => s.path === li.dataset.path);
      const visible = store !== undefined && matchesFilter(store, query);
      li.hidden = !visible;
      shown += visible ? 1 : 0;
    }
    const total = this._stores.length;
    const noun = total === 1 ? 'trace store' : 'trace stores';
    this._status.textContent =
      total === 0
        ? 'No trace stores under the server root. Write one with `workbench trace --input … --out name.zarr`.'
        : shown === total
          ? `${total} ${noun}`
          : `${shown} of ${total} ${noun} match “${query}”`;
  }

  private _item(store: IStoreEntry): HTMLLIElement {
    const li = element('li', 'wbl-store');
    li.dataset.path = store.path;
    const head = element('div', 'wbl-store-head');
    head.append(element('span', 'wbl-store-name', store.name));
    const badge = element(
      'span',
      `wbl-badge ${store.complete ? 'wbl-mod-complete' : 'wbl-mod-incomplete'}`,
      store.complete ? 'complete' : 'incomplete'
    );
    badge.title = store.complete
      ? 'every writer finished'
      : 'a writer did not finish: the store holds what it committed (resume with `workbench trace --resume`)';
    head.append(badge);
    li.append(head);
    if (store.path !== store.name) {
      li.append(element('div', 'wbl-store-path', store.path));
    }
    li.append(
      element(
        'div',
        'wbl-store-meta',
        `${store.model} · ${store.tokens.toLocaleString()} tokens · ${store.layers} layers · ${store.experts} experts`
      ),
      element('div', 'wbl-store-created', formatCreated(store.created))
    );
    const picture = element('div', 'wbl-picture', 'expert load…');
    li.append(picture);
    const actions = element('div', 'wbl-actions');
    const analysis = element('button', 'jp-Button wbl-open-analysis', 'Open analysis notebook');
    analysis.addEventListener('click', () => void this._commands.execute(CommandIDs.openAnalysis, { store: store.path }));
    const workbench = element('button', 'jp-Button wbl-open-workbench', 'Open in workbench');
    workbench.addEventListener('click', () => void this._commands.execute(CommandIDs.openWorkbench, { store: store.path }));
    actions.append(analysis, workbench);
    li.append(actions);
    return li;
  }

  private async _loadSummaries(stores: IStoreEntry[]): Promise<void> {
    const generation = ++this._generation;
    const queue = [...stores];
    const worker = async (): Promise<void> => {
      for (let store = queue.shift(); store !== undefined; store = queue.shift()) {
        if (generation !== this._generation) {
          return; // a newer refresh owns the list now
        }
        const key = `${store.path}|${store.tokens}|${store.created}`;
        const picture = this._list.querySelector<HTMLElement>(`li[data-path="${CSS.escape(store.path)}"] .wbl-picture`);
        if (!picture) {
          continue;
        }
        try {
          let summary = this._summaries.get(key);
          if (!summary) {
            summary = await fetchSummary(store.path);
            this._summaries.set(key, summary);
          }
          picture.replaceChildren(renderLoadPicture(summary.load_picture));
          picture.title = `expert load per MoE layer (rows) and expert (columns), from ${summary.sampled_tokens.toLocaleString()} tokens`;
        } catch (err) {
          picture.textContent = `expert load unavailable: ${err instanceof Error ? err.message : String(err)}`;
          picture.classList.add('wbl-mod-error');
        }
      }
    };
    await Promise.all(Array.from({ length: SUMMARY_CONCURRENCY }, worker));
  }

  private _filter: HTMLInputElement;
  private _status: HTMLDivElement;
  private _list: HTMLUListElement;
  private _errors: HTMLUListElement;
  private _stores: IStoreEntry[] = [];
  private _summaries = new Map<string, ISummary>();
  private _generation = 0;
}
