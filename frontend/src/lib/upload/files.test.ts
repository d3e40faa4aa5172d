import { describe, expect, it } from 'vitest';
import { chosenFiles, droppedFiles } from './files';

/** A file entry as a drop gives it. */
function fileEntry(path: string) {
	const name = path.split('/').pop() as string;
	const file = new File(['x'], name, { type: 'image/jpeg' });
	return {
		name,
		fullPath: `/${path}`,
		isFile: true,
		isDirectory: false,
		file: (resolve: (f: File) => void) => resolve(file)
	};
}

/** A folder entry whose reader answers in batches of two, then an empty batch. */
function folderEntry(path: string, children: unknown[]) {
	return {
		name: path.split('/').pop(),
		fullPath: `/${path}`,
		isFile: false,
		isDirectory: true,
		createReader() {
			let at = 0;
			return {
				readEntries(resolve: (batch: unknown[]) => void) {
					resolve(children.slice(at, at + 2));
					at += 2;
				}
			};
		}
	};
}

function drop(entries: unknown[]): DataTransfer {
	const items = entries.map((entry) => ({ kind: 'file', webkitGetAsEntry: () => entry, getAsFile: () => null }));
	return { items, files: [] } as unknown as DataTransfer;
}

describe('droppedFiles', () => {
	it('walks dropped folders to the bottom, every batch, leaving hidden files out', async () => {
		const trip = folderEntry('trip', [
			fileEntry('trip/1.jpg'),
			fileEntry('trip/.DS_Store'),
			fileEntry('trip/2.jpg'),
			folderEntry('trip/day2', [fileEntry('trip/day2/3.jpg'), fileEntry('trip/day2/4.jpg'), fileEntry('trip/day2/5.jpg')]),
			folderEntry('trip/.thumbs', [fileEntry('trip/.thumbs/t.jpg')])
		]);
		const picked = await droppedFiles(drop([trip, fileEntry('loose.jpg')]));
		expect(picked.map((p) => p.path)).toEqual([
			'trip/1.jpg',
			'trip/2.jpg',
			'trip/day2/3.jpg',
			'trip/day2/4.jpg',
			'trip/day2/5.jpg',
			'loose.jpg'
		]);
		expect(picked.every((p) => p.file instanceof File)).toBe(true);
	});
});

describe('chosenFiles', () => {
	it("keeps a folder input's paths and leaves hidden files out", () => {
		const file = (name: string, path: string) => {
			const f = new File(['x'], name);
			Object.defineProperty(f, 'webkitRelativePath', { value: path });
			return f;
		};
		const list = [file('a.jpg', 'album/a.jpg'), file('.hidden.jpg', 'album/.hidden.jpg'), file('b.png', '')];
		const picked = chosenFiles(list as unknown as FileList);
		expect(picked.map((p) => p.path)).toEqual(['album/a.jpg', 'b.png']);
	});
});
