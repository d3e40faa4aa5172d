/**
 * The files of a drop or a file input, folders walked to the bottom. Hidden files (a
 * leading dot: .DS_Store and the like) are left out; everything else goes to the server,
 * which says what it takes.
 */

/** A file and where it was in a dropped folder (its name otherwise). */
export interface Picked {
	file: File;
	path: string;
}

function hidden(name: string): boolean {
	return name.startsWith('.');
}

function fileOf(entry: FileSystemFileEntry): Promise<File> {
	return new Promise((resolve, reject) => entry.file(resolve, reject));
}

/** Every entry of a folder: readEntries answers in batches until it answers none. */
async function entriesOf(folder: FileSystemDirectoryEntry): Promise<FileSystemEntry[]> {
	const reader = folder.createReader();
	const all: FileSystemEntry[] = [];
	for (;;) {
		const batch = await new Promise<FileSystemEntry[]>((resolve, reject) =>
			reader.readEntries(resolve, reject)
		);
		if (batch.length === 0) return all;
		all.push(...batch);
	}
}

async function walk(entry: FileSystemEntry, into: Picked[]): Promise<void> {
	if (hidden(entry.name)) return;
	if (entry.isFile) {
		into.push({ file: await fileOf(entry as FileSystemFileEntry), path: entry.fullPath.replace(/^\//, '') });
	} else if (entry.isDirectory) {
		for (const child of await entriesOf(entry as FileSystemDirectoryEntry)) await walk(child, into);
	}
}

/** The files of a drop, folders included. The entries are taken at once: a DataTransfer's
 * items are gone once the drop event's handler returns. */
export async function droppedFiles(data: DataTransfer): Promise<Picked[]> {
	const entries: FileSystemEntry[] = [];
	const loose: File[] = [];
	for (const item of Array.from(data.items ?? [])) {
		if (item.kind !== 'file') continue;
		const entry = item.webkitGetAsEntry?.();
		if (entry) entries.push(entry);
		else {
			const file = item.getAsFile();
			if (file) loose.push(file);
		}
	}
	if (entries.length === 0 && loose.length === 0) loose.push(...Array.from(data.files ?? []));
	const picked: Picked[] = loose.filter((f) => !hidden(f.name)).map((file) => ({ file, path: file.name }));
	for (const entry of entries) await walk(entry, picked);
	return picked;
}

/** The files of a file input (a folder input gives each one's path in the folder). */
export function chosenFiles(list: FileList | null): Picked[] {
	return Array.from(list ?? [])
		.filter((file) => !file.webkitRelativePath.split('/').some(hidden) && !hidden(file.name))
		.map((file) => ({ file, path: file.webkitRelativePath || file.name }));
}
